"""lorasrv beyond one process: `lorasrv.deploy.ray` runs N engines as Ray Serve replicas behind one
HTTP ingress, routed by adapter. Nothing here is imported by the server itself.
"""
