"""Tools around the method: a real chat checkpoint end to end (`real`), benchmarks (`bench`), bytes per GPU
(`plan`), tables and plots (`report`), and the `drift-map` and `judge-check` commands."""
