VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.e3va-installed

.PHONY: demo test install mutation mutation-methods mutmut-installed mutation-hand check-venv

# The stamp makes a second `make` skip the install; editing setup.py or the installer refreshes it.
$(STAMP): setup.py tools/install.sh
	VENV=$(VENV) bash tools/install.sh
	touch $(STAMP)

# A venv whose python no longer runs (its interpreter moved or was removed: dangling links) is removed,
# so that the stamp is gone and the install below recreates it, instead of every command failing.
check-venv:
	@if [ -e $(VENV) ] && ! $(PYTHON) -c "" 2>/dev/null; then \
		echo "[make] $(VENV) is broken (its python does not run): recreating it"; rm -rf $(VENV); fi

install: check-venv $(STAMP)

test: check-venv $(STAMP)
	$(PYTHON) -m pytest tests -q

demo: check-venv $(STAMP)
	$(PYTHON) tools/demo.py

# Not part of `make test`. `make mutation`: mutmut (a dev tool, installed on demand, not a dependency)
# over the side network's memory code and the checkpoint writers (about 30 to 40 minutes on 2 busy CPU
# cores; results in .mutmut/mutants/: `tools/mutmut_run.sh results`, `tools/mutmut_run.sh show NAME`), then
# over the side networks' equations, methods/e3va.py and methods/losa.py (about 8 minutes; results in
# .mutmut-methods/mutants/: `tools/mutmut_run.sh methods results`). `make mutation-methods`: the second only.
# See docs/MUTATION.md.
mutation: mutmut-installed
	PYTHON=$(abspath $(PYTHON)) tools/mutmut_run.sh
	PYTHON=$(abspath $(PYTHON)) tools/mutmut_run.sh methods

mutation-methods: mutmut-installed
	PYTHON=$(abspath $(PYTHON)) tools/mutmut_run.sh methods

mutmut-installed: check-venv $(STAMP)
	$(PYTHON) -c "import mutmut" 2>/dev/null || $(PYTHON) -m pip install "mutmut>=3.8,<4"

# The hand-written mutants (about 15 minutes), each against the tests chosen to catch it; writes its
# table into docs/MUTATION.md.
mutation-hand: check-venv $(STAMP)
	$(PYTHON) tools/mutation_check.py --out docs/MUTATION.md
