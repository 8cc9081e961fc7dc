"""Storage: URIs, objects (get, put, list, create-if-absent), the activation store, integrity checks, the lease."""
