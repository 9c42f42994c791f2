"""The demo: an embedded config and a stand-in model server to run it with."""
