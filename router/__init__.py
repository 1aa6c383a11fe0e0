"""The router: the public API, the cluster map, the scheduler, sampling."""
