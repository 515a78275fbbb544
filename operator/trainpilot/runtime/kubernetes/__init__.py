"""The Kubernetes runtime: trials as Jobs, the ledger in ConfigMaps, decisions as Events."""
