"""Fanout: fan AI inference out over the devices of a PC and across machines.

    import runtime
    with runtime.start() as cluster:            # an embedded local cluster
        client = cluster.client()
        results = client.map("minilm", batch)   # each result says .device and .attempts
"""
from . import errors
from .client import AsyncClient, Chunk, Client, Completion, Result, connect
from .launcher import Cluster, start

__all__ = ["AsyncClient", "Chunk", "Client", "Cluster", "Completion", "Result", "connect",
           "errors", "start"]
__version__ = "0.1.0"
