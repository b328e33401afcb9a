"""Analysis tools that are not needed at run time: idealised schematics of the
strategies (`schematic`), drawn from the cost model."""
