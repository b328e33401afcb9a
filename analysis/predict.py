"""Predict one iteration of every strategy on a link, from a profile and a link fit.

    python -m analysis.predict --profile bench/results/profile_resnet20_b32.json \\
        --network bench/results/netfit_1gbit.json --ranks 2 [--batch-per-rank 16]

The profile (python -m analysis.profile) gives each layer's forward, backward
and update time; the link file (python -m bench.netfit, or a machine file in
bench/machines/) its alpha, beta and gamma. analysis/costmodel.simulate then
runs each strategy's hooks against the simulated progress thread and link
(docs/algorithm.md §2). Times scale linearly with the per-rank batch, a
first-order approximation. The engine is configured as bench/step.py runs
it (1 MiB chunks, a credit of 4, 1 MiB buckets), so the predictions compare
with bench.step's measurements.
"""

from __future__ import annotations

import argparse
import sys

from analysis import costmodel as cm

#: bench/step.py's configuration (the engine's defaults), which bench/model_check.py predicts too
STEP_ENGINE = cm.Engine()


def predict(profile: cm.Profile, net: cm.Network, ranks: int, batch_per_rank: int | None = None,
            engine: cm.Engine = STEP_ENGINE) -> list[cm.Result]:
    """One `Result` per strategy the engine implements, at `batch_per_rank` samples per rank."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    batch = profile.batch_per_rank if batch_per_rank is None else batch_per_rank
    if batch < 1:
        raise ValueError(f"batch_per_rank must be >= 1, got {batch}")
    layers = cm.scale_layers(profile.layers, batch=batch / profile.batch_per_rank)
    scaled = cm.Profile(layers, batch, profile.bn_bytes, profile.copy_s_per_byte,
                        profile.check_s_per_byte, profile.meta)
    return [cm.simulate(layers, net, s, ranks, engine=engine, profile=scaled)
            for s in cm.STRATEGIES]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.predict", description=__doc__.split("\n")[0])
    p.add_argument("--profile", required=True, help="per-layer times from python -m analysis.profile")
    p.add_argument("--network", required=True,
                   help="a bench.netfit result or a bench/machines/*.json file")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch-per-rank", type=int, default=None,
                   help="default: the profile's own batch")
    args = p.parse_args(argv)
    try:
        profile = cm.load_profile(args.profile)
        net = cm.Network.from_json(args.network)
        results = predict(profile, net, args.ranks, args.batch_per_rank)
    except (OSError, ValueError, KeyError) as e:
        print(f"analysis.predict: {e}", file=sys.stderr)
        return 2
    print(f"{profile.meta.get('model', args.profile)}, P = {args.ranks}, link {args.network}")
    print(f"{'strategy':10s} {'iter ms':>9s} {'compute ms':>11s} {'comm ms':>9s} {'overlap eff.':>13s}")
    for r in results:
        print(f"{r.strategy:10s} {1e3 * r.iter_s:9.1f} {1e3 * r.compute_s:11.1f} "
              f"{1e3 * r.comm_s:9.1f} {r.overlap_efficiency:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
