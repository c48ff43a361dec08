"""lorasrv on Ray Serve: N engines as replicas of one deployment, routed by adapter (Ray Serve's
model multiplexing), behind an ingress that serves lorasrv's own HTTP app.

`python -m lorasrv.deploy.ray --config server.toml --num-replicas 2`. Needs `lorasrv[ray]`.
Importing this package does not import Ray; the modules that need it import it themselves.
"""
