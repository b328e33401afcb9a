"""`priority`: layerwise, with chunks of layers nearer the input posted first
(docs/algorithm.md §1.4; P3, ByteScheduler).

The one change from `layerwise` is the priority of each request: its layer
index. The exchanger splits every gradient into chunks of `chunk_bytes` and
keeps at most `max_inflight` chunks in flight (the credit); the chunks not yet
posted wait in a queue ordered by priority. Layer 0's gradient, which is final
last, therefore overtakes the queued chunks of later layers, and the next
forward, which needs layer 0 first, starts as soon as layer 0 is averaged and
updated. Later layers keep communicating behind the forward of earlier ones.
Use small chunks (about 1 MiB) and a small credit (2-4) so that preemption
has something to preempt.
"""

from __future__ import annotations

from .layerwise import Layerwise


class Priority(Layerwise):
    name = "priority"

    def priority(self, i: int) -> int:
        return i
