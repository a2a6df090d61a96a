"""Site side: the ClientApp, local trainers, data, evaluation and private state."""
