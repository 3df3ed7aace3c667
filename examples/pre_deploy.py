"""Pre-deployment check: gate a registered model on harden's policy, then promote it.

    python examples/pre_deploy.py models:/fraud-cnn@candidate --policy harden-policy.yaml --promote champion

Exits with the gate's code (0 pass, 1 fail, 2 could not decide) and moves the alias only
on a pass, so a deployment script can run it with `set -e` in front of the rollout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harden import tracking
from harden.errors import EXIT_OK, HardenError
from harden.gate import Policy, gate
from harden.report import emit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--policy", type=Path, default=Path("harden-policy.yaml"))
    parser.add_argument("--promote", metavar="ALIAS", help="Alias to set on the version when the gate passes.")
    parser.add_argument("--cached-only", action="store_true", help="Use the registry hook's scan; never scan here.")
    args = parser.parse_args()
    tracking.configure()
    try:
        result = gate(args.model, Policy.load(args.policy), cached_only=args.cached_only)
    except HardenError as exc:
        print(f"pre-deploy: {exc}", file=sys.stderr)
        return exc.exit_code
    emit(result.report(), "text")
    if result.exit_code == EXIT_OK and args.promote:
        version = tracking.resolve_registered_version(args.model)
        if version is None:
            print("pre-deploy: --promote needs a registered model version (models:/name/version or @alias)", file=sys.stderr)
            return 2
        from mlflow.tracking import MlflowClient

        MlflowClient().set_registered_model_alias(version.name, args.promote, version.version)
        print(f"promoted {version.uri} to @{args.promote}")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
