"""Services of the fleetserve mesh, one package each."""

import os

# gRPC's core writes a plain-text INFO line to stderr for every refused TLS handshake (a client without the
# fleet's certificate, a port scan): the services' logs are one JSON object per line, and a stranger must not
# be able to fill them. Errors still show. Read when grpc is first imported, which the service packages do.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
