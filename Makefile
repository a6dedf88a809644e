# The two commands of the README, and a few helpers. Everything real lives in scripts/.
.PHONY: demo test crd fmt

demo: ## Run the demo: local control plane + mde-sim + operator + examples/
	scripts/demo.sh

test: ## Run the whole test suite (what CI runs)
	scripts/test.sh

crd: ## Regenerate crds/ and the chart's copy from the Rust types
	cargo run --quiet --bin mde-isolation-operator -- crd > crds/deviceisolations.isolation.mde.dev.yaml
	cp crds/deviceisolations.isolation.mde.dev.yaml charts/mde-isolation-operator/crds/

fmt:
	cargo fmt --all
