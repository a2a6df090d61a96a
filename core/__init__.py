"""What server and sites share: the run configuration and device selection."""
