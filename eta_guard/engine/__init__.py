"""ETA's one request path: the async stage machine every backend runs through (:mod:`.request`)."""
