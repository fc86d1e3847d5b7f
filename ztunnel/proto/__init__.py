"""Wire definitions (.proto) of the ztunnel's gRPC APIs and their generated modules.

Regenerate with `make proto` after editing a .proto file; the generated *_pb2*.py
files are committed so that a fresh machine needs no code generator.
"""
