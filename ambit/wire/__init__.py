"""The wire schemas, pure: the agent's snapshot feed to its ztunnel (`feed.proto`, `snapshot`)
and the CA's `IstioCertificateService` messages (`ca`)."""
