"""Server side: the ServerApp, its round loop and the results it writes."""
