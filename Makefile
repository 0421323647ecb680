# Two entry points for a newcomer: `make demo` (segment the bundled demo images) and
# `make test`. Both create .venv on first use; later runs reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean display

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cellnest segment demo/images --out demo/output --overlay --overwrite

# The napari plugin's tests need an OpenGL display. On a headless Debian machine (CI) this
# installs Xvfb and the libraries Qt's xcb platform loads, best effort: without them those
# tests skip, and the rest of the suite runs as before.
XVFB_PACKAGES := xvfb libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
	libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-shape0 libxcb-cursor0

display:
	@[ -n "$$DISPLAY" ] || { command -v xvfb-run >/dev/null 2>&1 && ldconfig -p | grep -q libxcb-cursor.so.0; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get install -y -q $(XVFB_PACKAGES) >/dev/null 2>&1; } || \
	  echo "no Xvfb here: the napari tests will skip"

test: $(STAMP) display
	@if [ -z "$$DISPLAY" ] && command -v xvfb-run >/dev/null 2>&1; then \
	  echo 'xvfb-run -a $(BIN)/python -m pytest -q'; xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/python -m pytest -q; \
	else echo '$(BIN)/python -m pytest -q'; $(BIN)/python -m pytest -q; fi

clean:
	rm -rf $(VENV) demo/output
