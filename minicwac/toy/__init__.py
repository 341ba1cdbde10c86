"""The toy world around the core: a synthetic chat world, its pretrain -> align -> fine-tune pipeline, and the
experiments (method grid, selection on a dev seed, reports and plots) that read it. Imports the core, never
the other way."""
