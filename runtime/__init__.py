"""Fanout: fan AI inference out over the devices of a PC and across machines."""
