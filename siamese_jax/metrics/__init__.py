"""Evaluation metrics: arrays in, numbers out. No file I/O, no workdirs, no models: a model enters as
`embed_fn(variables, images)` and a `scoring.Scorer`."""
