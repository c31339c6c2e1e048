"""Stage 3, engine: what runs on a device: trunk features, g and its fitting, the Var table, training loops."""
