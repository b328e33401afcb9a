"""Analysis of the engine, not needed at run time: the alpha-beta-gamma cost
model and its event simulation (`costmodel`), per-layer profiles (`profile`),
measured timelines (`plot_trace`), idealised ones (`schematic`) and
per-strategy predictions (`predict`)."""
