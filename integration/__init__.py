"""Integration tests: real etcd processes, real sockets."""
