"""Running a config on Kubernetes: rendering manifests (pure functions, no torch, no cluster),
reading job status, the cluster client, and a local backend that runs a rendered job here.

`render` and `status` import neither torch nor the kubernetes client, so `audiorl render` stays fast.
"""
