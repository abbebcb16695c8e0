VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.e3va-installed

.PHONY: demo test install

# The stamp makes a second `make` skip the install; editing setup.py or the installer refreshes it.
$(STAMP): setup.py tools/install.sh
	VENV=$(VENV) bash tools/install.sh
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest tests -q

demo: $(STAMP)
	$(PYTHON) tools/demo.py
