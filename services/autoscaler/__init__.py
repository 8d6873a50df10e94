"""The autoscaler: a control-plane service that decides a desired replica count per model from policies and has
provisioners start and drain replicas (docs/autoscaling.md)."""
