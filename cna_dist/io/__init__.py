"""Storage: URIs, objects (get, put, list, create-if-absent), the activation store, streamed reduce, lease, registry."""
