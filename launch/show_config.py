"""Print the resolved configuration: `python launch/show_config.py --config F [--a.b=v ...]`."""
import argparse

import yaml

from gld.config import load_config_or_exit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=None, help="YAML file (may use `extends:`)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config_or_exit(args.config, overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


if __name__ == "__main__":
    main()
