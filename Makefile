# The two commands of the README, and a few helpers. Everything real lives in scripts/.
.PHONY: demo test bench crd fmt

demo: ## Run the demo: local control plane + mde-sim + operator + examples/
	scripts/demo.sh

test: ## Run the whole test suite (what CI runs)
	scripts/test.sh

bench: ## Run the benchmark; writes docs/benchmarks.md and .json (a subset: make bench SCENARIOS="n100 latency")
	scripts/build-control-plane.sh >/dev/null
	scripts/install-tools.sh
	cargo build --release --quiet -p mde-sim
	cargo bench --bench operator -- $(SCENARIOS)

crd: ## Regenerate crds/ and the chart's copy from the Rust types (and copy policies/ into the chart)
	cargo build --quiet --bin mde-isolation-operator
	$${CARGO_TARGET_DIR:-target}/debug/mde-isolation-operator crd --kind DeviceIsolation > crds/.crd.yaml.tmp
	mv crds/.crd.yaml.tmp crds/deviceisolations.isolation.mde.dev.yaml
	$${CARGO_TARGET_DIR:-target}/debug/mde-isolation-operator crd --kind DeviceIsolationSet > crds/.crd.yaml.tmp
	mv crds/.crd.yaml.tmp crds/deviceisolationsets.isolation.mde.dev.yaml
	$${CARGO_TARGET_DIR:-target}/debug/mde-isolation-operator crd --kind MdeConnection > crds/.crd.yaml.tmp
	mv crds/.crd.yaml.tmp crds/mdeconnections.isolation.mde.dev.yaml
	$${CARGO_TARGET_DIR:-target}/debug/mde-isolation-operator crd --kind ClusterMdeConnection > crds/.crd.yaml.tmp
	mv crds/.crd.yaml.tmp crds/clustermdeconnections.isolation.mde.dev.yaml
	cp crds/*.isolation.mde.dev.yaml charts/mde-isolation-operator/crds/
	cp policies/accountability.yaml charts/mde-isolation-operator/policies/

fmt:
	cargo fmt --all
