package main

// How Flux sees a DeviceIsolation and a DeviceIsolationSet: Flux's health checks (Kustomization `wait: true` and
// `healthChecks`) compute each object's status with kstatus, the library tested here
// (sigs.k8s.io/cli-utils/pkg/kstatus/status). kstatus reads the Reconciling and Stalled
// conditions, the Ready condition, and status.observedGeneration against metadata.generation.
//
// The test starts the control plane of this directory (the binary built and cached by
// scripts/build-control-plane.sh, or the cluster of MDE_TEST_KUBECONFIG), installs ../../crds,
// and creates one live DeviceIsolation per phase fixture of ../fixtures/phases (produced by the
// real planner, see tests/status_fixtures.rs) and one live DeviceIsolationSet per fixture of
// ../fixtures/set-phases (produced by the real rollout, see tests/set_status_fixtures.rs):
// create, then write the fixture's status through the status subresource, then, for a fixture
// whose generation is 2, edit the spec. It reads each object back and asserts what kstatus and
// the healthCheckExprs of docs/gitops.md make of it.
//
// Run it with `go test ./...` in this directory (scripts/test.sh does). It never skips: a
// control plane that cannot be built or started fails the test.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/cel-go/cel"
	celtypes "github.com/google/cel-go/common/types"
	"github.com/google/cel-go/ext"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

const (
	fixturesDir    = "../fixtures/phases"
	setFixturesDir = "../fixtures/set-phases"
	crdsDir        = "../../crds"
	buildScript    = "../../scripts/build-control-plane.sh"
	gitopsDocs     = "../../docs/gitops.md"
	// readyTimeout bounds the wait for the harness's READY line (it gives up after 3 minutes).
	readyTimeout = 4 * time.Minute
)

var (
	crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	nsGVR  = schema.GroupVersionResource{Version: "v1", Resource: "namespaces"}
	diGVR  = schema.GroupVersionResource{Group: "isolation.mde.dev", Version: "v1alpha1", Resource: "deviceisolations"}
	setGVR = schema.GroupVersionResource{Group: "isolation.mde.dev", Version: "v1alpha1", Resource: "deviceisolationsets"}
)

// phase is one fixture and what kstatus must say about it.
type phase struct {
	// fixture is the file stem under its kind's fixtures directory.
	fixture string
	// createFrom names the fixture whose spec the object is created with, when the fixture's
	// own spec is an edit made after the status was written (a new generation).
	createFrom string
	// want is what kstatus says, for the reason why.
	want status.Status
	why  string
	// wantExprs is what the healthCheckExprs of docs/gitops.md say under Flux's rules; empty
	// means they cannot be evaluated yet (Flux reports an error and checks again).
	wantExprs status.Status
}

var phases = []phase{
	{
		fixture: "just-applied",
		want:    status.InProgressStatus,
		// The API server drops status on create; the CRD defaults it to observedGeneration 0,
		// so an object the operator has not reconciled yet is behind its generation.
		why:       "status.observedGeneration 0 (the CRD's default) is below metadata.generation 1",
		wantExprs: status.InProgressStatus,
	},
	{fixture: "action-pending", want: status.InProgressStatus, why: "Reconciling=True", wantExprs: status.InProgressStatus},
	{fixture: "released", want: status.CurrentStatus, why: "Ready=True for the current generation", wantExprs: status.CurrentStatus},
	{fixture: "stalled", want: status.FailedStatus, why: "Stalled=True", wantExprs: status.FailedStatus},
	{
		fixture: "new-generation", createFrom: "released",
		want: status.InProgressStatus, why: "status.observedGeneration < metadata.generation",
		wantExprs: status.InProgressStatus,
	},
}

// setPhases are the DeviceIsolationSet fixtures of ../fixtures/set-phases.
var setPhases = []phase{
	{
		fixture: "set-just-applied",
		want:    status.InProgressStatus,
		// As for a DeviceIsolation: the CRD defaults status to observedGeneration 0 (and zero
		// device counts), below metadata.generation 1.
		why:       "status.observedGeneration 0 (the CRD's default) is below metadata.generation 1",
		wantExprs: status.InProgressStatus,
	},
	{
		fixture: "set-paused",
		// A paused set is not done: it holds a Flux health check (wait: true) until its timeout.
		want: status.InProgressStatus, why: "Reconciling=True (Paused)",
		wantExprs: status.InProgressStatus,
	},
	{fixture: "set-rolling-out", want: status.InProgressStatus, why: "Reconciling=True (RollingOut)", wantExprs: status.InProgressStatus},
	{fixture: "set-converged", want: status.CurrentStatus, why: "Ready=True for the current generation", wantExprs: status.CurrentStatus},
	{fixture: "set-too-large", want: status.FailedStatus, why: "Stalled=True (SelectionTooLarge)", wantExprs: status.FailedStatus},
	{
		fixture: "set-new-generation", createFrom: "set-converged",
		want: status.InProgressStatus, why: "status.observedGeneration < metadata.generation",
		wantExprs: status.InProgressStatus,
	},
}

func TestEveryPhaseFixtureHasAKstatusCase(t *testing.T) {
	checkCoverage(t, fixturesDir, phases)
}

func TestEverySetPhaseFixtureHasAKstatusCase(t *testing.T) {
	checkCoverage(t, setFixturesDir, setPhases)
}

// checkCoverage fails unless cases name exactly the fixtures of dir.
func checkCoverage(t *testing.T, dir string, cases []phase) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	var stems, covered []string
	for _, f := range files {
		stems = append(stems, strings.TrimSuffix(filepath.Base(f), ".json"))
	}
	for _, p := range cases {
		covered = append(covered, p.fixture)
	}
	sort.Strings(stems)
	sort.Strings(covered)
	if len(stems) == 0 || !reflect.DeepEqual(stems, covered) {
		t.Fatalf("fixtures of %s %v, kstatus cases %v: a new phase fixture needs its expected kstatus here", dir, stems, covered)
	}
}

func TestKstatusReadsEveryPhase(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	kubeconfig := controlPlane(t)
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatalf("load %s: %v", kubeconfig, err)
	}
	client, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	exprs := docsHealthCheckExprs(t)
	installCRDs(ctx, t, client)
	ns := createNamespace(ctx, t, client)

	t.Run("DeviceIsolation", func(t *testing.T) {
		checkPhases(ctx, t, client.Resource(diGVR).Namespace(ns), ns, fixturesDir, phases, exprs["DeviceIsolation"])
	})
	t.Run("DeviceIsolationSet", func(t *testing.T) {
		checkPhases(ctx, t, client.Resource(setGVR).Namespace(ns), ns, setFixturesDir, setPhases, exprs["DeviceIsolationSet"])
	})
}

// checkPhases creates each fixture of dir live through api (in namespace ns), writes its status,
// edits its spec for a new generation, and asserts what kstatus and exprs (the healthCheckExprs
// of docs/gitops.md for the fixtures' kind) say of what the API server returns.
func checkPhases(ctx context.Context, t *testing.T, api dynamic.ResourceInterface, ns, dir string, cases []phase, exprs *healthCheckExprs) {
	if exprs == nil {
		t.Fatalf("%s has no healthCheckExprs entry for the kind of %s", gitopsDocs, dir)
	}
	for _, p := range cases {
		t.Run(p.fixture, func(t *testing.T) {
			want := readFixture(t, dir, p.fixture)
			if kind := want.GetKind(); kind != exprs.kind {
				t.Fatalf("fixture of kind %s checked with the healthCheckExprs of %s", kind, exprs.kind)
			}
			created := want.DeepCopy()
			unstructured.RemoveNestedField(created.Object, "status")
			created.SetNamespace(ns)
			if p.createFrom != "" {
				spec, _, _ := unstructured.NestedMap(readFixture(t, dir, p.createFrom).Object, "spec")
				created.Object["spec"] = spec
			}
			live := createWhenServed(ctx, t, api, created)

			if fixtureStatus, ok := want.Object["status"]; ok {
				live.Object["status"] = fixtureStatus
				var err error
				if live, err = api.UpdateStatus(ctx, live, metav1.UpdateOptions{}); err != nil {
					t.Fatalf("write status: %v", err)
				}
			}
			if p.createFrom != "" {
				patch, _ := json.Marshal(map[string]any{"spec": want.Object["spec"]})
				if _, err := api.Patch(ctx, live.GetName(), types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
					t.Fatalf("edit spec: %v", err)
				}
			}

			got, err := api.Get(ctx, want.GetName(), metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			// The live object must be the fixture: the schema kept every field of the status,
			// and the spec edit made the generation the fixture has.
			if got.GetGeneration() != want.GetGeneration() {
				t.Fatalf("metadata.generation %d, fixture has %d", got.GetGeneration(), want.GetGeneration())
			}
			if a, b := normalized(t, got.Object["status"]), normalized(t, want.Object["status"]); !reflect.DeepEqual(a, b) {
				t.Fatalf("live status differs from the fixture:\nlive:    %s\nfixture: %s", a, b)
			}
			if a, b := normalized(t, got.Object["spec"]), normalized(t, want.Object["spec"]); !reflect.DeepEqual(a, b) {
				t.Fatalf("live spec differs from the fixture:\nlive:    %s\nfixture: %s", a, b)
			}

			res, err := status.Compute(got)
			if err != nil {
				t.Fatalf("kstatus: %v", err)
			}
			if res.Status != p.want {
				t.Fatalf("kstatus says %s (%q), want %s: %s", res.Status, res.Message, p.want, p.why)
			}
			t.Logf("%s: kstatus %s (%s)", p.fixture, res.Status, res.Message)

			byExprs, err := exprs.evaluate(ctx, got)
			switch {
			case p.wantExprs == "" && err == nil:
				t.Fatalf("healthCheckExprs of %s say %s, want an evaluation error (no status yet)", gitopsDocs, byExprs)
			case p.wantExprs != "" && err != nil:
				t.Fatalf("healthCheckExprs of %s: %v", gitopsDocs, err)
			case byExprs != p.wantExprs:
				t.Fatalf("healthCheckExprs of %s say %s, want %s", gitopsDocs, byExprs, p.wantExprs)
			}
			t.Logf("%s: healthCheckExprs %s (%v)", p.fixture, byExprs, err)
		})
	}
}

// healthCheckExprs are the CEL expressions of a Flux Kustomization's spec.healthCheckExprs entry.
type healthCheckExprs struct {
	kind                        string
	inProgress, failed, current cel.Program
}

// docsHealthCheckExprs parses the healthCheckExprs example of docs/gitops.md, by kind, the way
// Flux does: parsed, not type-checked (an object's fields are not declared), with optional types
// and the string, set and encoder extensions.
func docsHealthCheckExprs(t *testing.T) map[string]*healthCheckExprs {
	t.Helper()
	data, err := os.ReadFile(gitopsDocs)
	if err != nil {
		t.Fatal(err)
	}
	_, example, found := strings.Cut(string(data), "healthCheckExprs:")
	if !found {
		t.Fatalf("%s has no healthCheckExprs example", gitopsDocs)
	}
	example, _, _ = strings.Cut(example, "```")
	var parsed struct {
		HealthCheckExprs []struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			InProgress string `json:"inProgress"`
			Failed     string `json:"failed"`
			Current    string `json:"current"`
		} `json:"healthCheckExprs"`
	}
	if err := yaml.UnmarshalStrict([]byte("healthCheckExprs:"+example), &parsed); err != nil {
		t.Fatalf("%s: the healthCheckExprs example: %v", gitopsDocs, err)
	}
	env, err := cel.NewEnv(
		cel.HomogeneousAggregateLiterals(),
		cel.DefaultUTCTimeZone(true),
		cel.CrossTypeNumericComparisons(true),
		cel.OptionalTypes(),
		ext.Strings(), ext.Sets(), ext.Encoders(),
	)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*healthCheckExprs{}
	for _, entry := range parsed.HealthCheckExprs {
		if entry.APIVersion != "isolation.mde.dev/v1alpha1" {
			t.Fatalf("%s: healthCheckExprs entry for %s has apiVersion %q", gitopsDocs, entry.Kind, entry.APIVersion)
		}
		if entry.Current == "" {
			t.Fatalf("%s: the healthCheckExprs entry for %s has no current expression", gitopsDocs, entry.Kind)
		}
		if out[entry.Kind] != nil {
			t.Fatalf("%s: two healthCheckExprs entries for %s", gitopsDocs, entry.Kind)
		}
		program := func(key, source string) cel.Program {
			if source == "" {
				return nil
			}
			ast, issues := env.Parse(source)
			if issues != nil && issues.Err() != nil {
				t.Fatalf("%s: %s %s expression: %v", gitopsDocs, entry.Kind, key, issues.Err())
			}
			prg, err := env.Program(ast)
			if err != nil {
				t.Fatalf("%s: %s %s expression: %v", gitopsDocs, entry.Kind, key, err)
			}
			return prg
		}
		out[entry.Kind] = &healthCheckExprs{
			kind:       entry.Kind,
			inProgress: program("inProgress", entry.InProgress),
			failed:     program("failed", entry.Failed),
			current:    program("current", entry.Current),
		}
	}
	return out
}

// evaluate applies Flux's rules for healthCheckExprs (its RFC 0009): a status.observedGeneration
// other than metadata.generation is InProgress; otherwise the first of inProgress, failed and
// current that is true decides; none true is InProgress. An expression that cannot be evaluated
// (a field that does not exist yet) is an error.
func (e *healthCheckExprs) evaluate(ctx context.Context, u *unstructured.Unstructured) (status.Status, error) {
	observed, found, _ := unstructured.NestedInt64(u.Object, "status", "observedGeneration")
	if found && observed != u.GetGeneration() {
		return status.InProgressStatus, nil
	}
	for _, step := range []struct {
		prg    cel.Program
		status status.Status
	}{{e.inProgress, status.InProgressStatus}, {e.failed, status.FailedStatus}, {e.current, status.CurrentStatus}} {
		if step.prg == nil {
			continue
		}
		val, _, err := step.prg.ContextEval(ctx, u.Object)
		if err != nil {
			return "", err
		}
		b, ok := val.(celtypes.Bool)
		if !ok {
			return "", fmt.Errorf("expression for %s is not a boolean: %v", step.status, val)
		}
		if b {
			return step.status, nil
		}
	}
	return status.InProgressStatus, nil
}

// readFixture parses <dir>/<stem>.json.
func readFixture(t *testing.T, dir, stem string) *unstructured.Unstructured {
	t.Helper()
	path := filepath.Join(dir, stem+".json")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (the fixtures come from tests/status_fixtures.rs and tests/set_status_fixtures.rs)", err)
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(data); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return u
}

// normalized is v as compact JSON with sorted keys, so that int64 and float64 numbers and map
// orders compare equal.
func normalized(t *testing.T, v any) string {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var generic any
	if err := json.Unmarshal(data, &generic); err != nil {
		t.Fatal(err)
	}
	out, err := json.Marshal(generic)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// controlPlane returns an admin kubeconfig: MDE_TEST_KUBECONFIG, or the one of a harness started
// here and stopped when the test ends.
func controlPlane(t *testing.T) string {
	t.Helper()
	if kc := os.Getenv("MDE_TEST_KUBECONFIG"); kc != "" {
		return kc
	}
	build := exec.Command("bash", buildScript)
	build.Stderr = os.Stderr
	out, err := build.Output()
	if err != nil {
		t.Fatalf("%s failed: %v (it builds the control plane; see its output above)", buildScript, err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	bin := strings.TrimSpace(lines[len(lines)-1])
	if bin == "" {
		t.Fatalf("%s printed no binary path", buildScript)
	}

	cmd := exec.Command(bin, "--exit-on-stdin-eof")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	logs := &tail{}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		// Closing stdin is the harness's signal to shut down cleanly.
		_ = stdin.Close()
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})

	ready := make(chan string, 1)
	go func() {
		scanner := bufio.NewScanner(stdout)
		for scanner.Scan() {
			if path, ok := strings.CutPrefix(scanner.Text(), "READY "); ok {
				ready <- path
			}
		}
		// Drain whatever is left so that the harness never blocks on a full pipe.
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case path := <-ready:
		return path
	case err := <-exited:
		t.Fatalf("control plane exited before READY (%v); log tail:\n%s", err, logs)
	case <-time.After(readyTimeout):
		t.Fatalf("no READY line from the control plane within %s; log tail:\n%s", readyTimeout, logs)
	}
	return ""
}

// tail keeps the last 16 KiB written to it (the harness's log, for failure messages).
type tail struct {
	mu  sync.Mutex
	buf []byte
}

func (l *tail) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	if over := len(l.buf) - 16<<10; over > 0 {
		l.buf = l.buf[over:]
	}
	return len(p), nil
}

func (l *tail) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return string(l.buf)
}

// installCRDs server-side applies every CRD of ../../crds and waits until each is Established.
func installCRDs(ctx context.Context, t *testing.T, client dynamic.Interface) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(crdsDir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no CRDs in %s (%v)", crdsDir, err)
	}
	var names []string
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, doc := range bytes.Split(data, []byte("\n---")) {
			if len(bytes.TrimSpace(doc)) == 0 {
				continue
			}
			js, err := yaml.YAMLToJSON(doc)
			if err != nil {
				t.Fatalf("%s: %v", file, err)
			}
			crd := &unstructured.Unstructured{}
			if err := crd.UnmarshalJSON(js); err != nil {
				t.Fatalf("%s: %v", file, err)
			}
			if _, err := client.Resource(crdGVR).Apply(ctx, crd.GetName(), crd, metav1.ApplyOptions{FieldManager: "kstatus-test", Force: true}); err != nil {
				t.Fatalf("apply CRD %s: %v", crd.GetName(), err)
			}
			names = append(names, crd.GetName())
		}
	}
	for _, name := range names {
		poll(ctx, t, "CRD "+name+" Established", func() (bool, error) {
			crd, err := client.Resource(crdGVR).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			conditions, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
			for _, c := range conditions {
				c, _ := c.(map[string]any)
				if c["type"] == "Established" && c["status"] == "True" {
					return true, nil
				}
			}
			return false, nil
		})
	}
}

// createNamespace creates kstatus-<random> and returns its name.
func createNamespace(ctx context.Context, t *testing.T, client dynamic.Interface) string {
	t.Helper()
	name := "kstatus-" + rand.String(8)
	ns := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1",
		"kind":       "Namespace",
		"metadata":   map[string]any{"name": name, "labels": map[string]any{"mde.dev/test": "true"}},
	}}
	if _, err := client.Resource(nsGVR).Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	return name
}

// createWhenServed creates obj, retrying while the just-established CRD is not served yet.
func createWhenServed(ctx context.Context, t *testing.T, api dynamic.ResourceInterface, obj *unstructured.Unstructured) *unstructured.Unstructured {
	t.Helper()
	var created *unstructured.Unstructured
	poll(ctx, t, "create "+obj.GetName(), func() (bool, error) {
		var err error
		created, err = api.Create(ctx, obj, metav1.CreateOptions{})
		if err != nil && strings.Contains(err.Error(), "the server could not find the requested resource") {
			return false, nil
		}
		return err == nil, err
	})
	return created
}

// poll calls f every 100 ms until it returns true, failing on an error or after 60 s.
func poll(ctx context.Context, t *testing.T, what string, f func() (bool, error)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		done, err := f()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if done {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: not done within 60s", what)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
