"""Deploy tier: the Dockerfile, docker-compose files and Kubernetes manifests, validated offline (a
package, so its module names cannot clash with other tiers')."""
