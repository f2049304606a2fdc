# The two commands a newcomer needs: `make test` and `make demo`.
PY := .venv/bin/python
PIP := .venv/bin/pip
VENV_STAMP := .venv/.installed

$(VENV_STAMP): setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -e '.[all,test,reference]'
	# tinysoundfont's declared pyaudio dependency does not build and is not needed to render.
	$(PIP) install -q --no-deps 'tinysoundfont>=0.3.7'
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

test: $(VENV_STAMP)
	JAX_NUM_CPU_DEVICES=8 $(PY) -m pytest -q -n 2 --dist loadgroup tests

# The demo re-executes itself with the CPU block cache preloaded where it can build it
# (pupujepa_jax/block_cache.py; README, Speed).
demo: $(VENV_STAMP)
	$(PY) -m pupujepa_jax.demo --out demo_out

.PHONY: venv test demo
