"""The README cannot rot: every `pupujepa` command in it parses with the real CLI parser,
names existing config files whose arguments load, and the two make targets exist.

What each command does is tested in its own module (test_trainer, test_export, ...) and
end to end by `make demo`.
"""
import pathlib
import re
import shlex

import pytest

from pupujepa_jax import cli
from pupujepa_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
  text = (ROOT / "README.md").read_text()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    joined = block.replace("\\\n", " ")
    commands += [line.split("#")[0].strip() for line in joined.splitlines()
                 if line.strip().startswith(("pupujepa ", "make "))]
  return commands


def test_readme_shows_the_two_commands_and_make_has_them():
  commands = readme_commands()
  assert "make demo" in commands and "make test" in commands
  makefile = (ROOT / "Makefile").read_text()
  assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith("pupujepa")])
def test_readme_command_parses_and_its_config_loads(command):
  argv = shlex.split(command)[1:]
  args, extra = cli.build_parser().parse_known_args(argv)
  assert all(e.startswith("--config.") for e in extra), extra
  spec = getattr(args, "config", None)
  if spec:
    cfg = config_lib.load_config(str(ROOT / spec))
    config_lib.apply_overrides(cfg, extra)
