VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.e3va-installed

.PHONY: demo test install mutation

# The stamp makes a second `make` skip the install; editing setup.py or the installer refreshes it.
$(STAMP): setup.py tools/install.sh
	VENV=$(VENV) bash tools/install.sh
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest tests -q

demo: $(STAMP)
	$(PYTHON) tools/demo.py

# Not part of `make test` (about 15 minutes on 2 CPU cores): hand-written mutants, each against the tests
# chosen to catch it; writes its table into docs/MUTATION.md.
mutation: $(STAMP)
	$(PYTHON) tools/mutation_check.py --out docs/MUTATION.md
