"""Where harden plugs into other systems: MLflow registry webhooks (`integrations.mlflow`).

The GitHub Action for the CI gate is not Python; it lives in the repository's top-level
`integrations/github/`.
"""
