// Command kube-control-plane runs a real Kubernetes API server for tests: the
// upstream kube-apiserver entry point (k8s.io/kubernetes/cmd/kube-apiserver/app)
// backed by an etcd member embedded in the same process. It is not a fake: every
// request goes through the real authentication, RBAC, admission, validation,
// CRD and storage code.
//
// Of the kube-controller-manager, only the upstream garbage collector
// (k8s.io/kubernetes/pkg/controller/garbagecollector) runs in this process,
// wired as kube-controller-manager wires it: objects whose owners are deleted
// are deleted in turn (background and foreground cascades, also for the
// resources of CRDs installed after start). No other controller runs, so
// namespaces stay Terminating after deletion and no default ServiceAccount is
// created. --no-garbage-collector turns the collector off.
//
// On success it writes <data-dir>/kubeconfig (admin, group system:masters) and
// one <data-dir>/kubeconfig-NS-NAME per --service-account NS/NAME, then prints
// exactly one line "READY <absolute admin kubeconfig path>" on stdout. Logs go
// to stderr.
//
// Usage:
//
//	kube-control-plane [--data-dir DIR] [--port N] [--service-account NS/NAME]...
//	                   [--exit-on-stdin-eof] [--no-garbage-collector]
//
// The go.mod pins k8s.io/kubernetes and maps each of its staging modules
// (the "=> ./staging/src/..." replace lines of the kubernetes go.mod) to the
// matching v0.X.Y release. To move to another Kubernetes version v1.X.Y:
//
//	dir=$(go mod download -json k8s.io/kubernetes@v1.X.Y | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
//	for m in $(sed -n 's#^\s*\(k8s.io/[^ ]*\) => ./staging/.*#\1#p' "$dir/go.mod"); do
//	  go mod edit -replace="$m=$m@v0.X.Y"
//	done
//	go get k8s.io/kubernetes@v1.X.Y && go mod tidy
//
// and align go.etcd.io/etcd/server/v3 with the version the kubernetes go.mod pins.
package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	_ "time/tzdata" // CronJob time zone validation, as in the upstream kube-apiserver main

	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/storage/wal"
	"go.uber.org/zap"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/metadata/metadatainformer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/client-go/util/cert"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // same as upstream main: --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // same as upstream main: client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // same as upstream main: version metric
	"k8s.io/controller-manager/pkg/informerfactory"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	"k8s.io/kubernetes/pkg/controller/garbagecollector"
)

// startupTimeout bounds the wait for etcd and the API server. It is generous
// because the test machines are small and often busy compiling.
const startupTimeout = 3 * time.Minute

// shutdownTimeout bounds the graceful stop of the API server before etcd is
// closed underneath it anyway.
const shutdownTimeout = 20 * time.Second

// serviceAccount is one --service-account NS/NAME identity.
type serviceAccount struct {
	namespace, name, token string
}

// saFlag collects the repeatable --service-account flag.
type saFlag []serviceAccount

func (f *saFlag) String() string {
	parts := make([]string, 0, len(*f))
	for _, sa := range *f {
		parts = append(parts, sa.namespace+"/"+sa.name)
	}
	return strings.Join(parts, ",")
}

func (f *saFlag) Set(v string) error {
	ns, name, ok := strings.Cut(v, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return fmt.Errorf("want NAMESPACE/NAME, got %q", v)
	}
	// The identity ends up in a CSV file and in a file name: keep to the
	// characters Kubernetes allows in namespace and object names anyway.
	for _, s := range []string{ns, name} {
		if strings.Trim(s, "abcdefghijklmnopqrstuvwxyz0123456789-.") != "" {
			return fmt.Errorf("invalid name %q: use lower-case letters, digits, '-' and '.'", s)
		}
	}
	*f = append(*f, serviceAccount{namespace: ns, name: name})
	return nil
}

func main() {
	os.Exit(run())
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kube-control-plane: "+format+"\n", args...)
}

func run() int {
	// A private flag set: the Kubernetes packages register their own flags on
	// the global sets, and the API server gets its arguments from us, not os.Args.
	fs := flag.NewFlagSet("kube-control-plane", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "", "directory for etcd data, certificates and kubeconfigs (default: a new temporary directory, removed on exit)")
	port := fs.Int("port", 0, "secure port of the API server on 127.0.0.1 (0: a free port)")
	exitOnEOF := fs.Bool("exit-on-stdin-eof", false, "shut down when standard input is closed (ties the server's life to a parent process)")
	noGC := fs.Bool("no-garbage-collector", false, "do not run the garbage collector (owners' deletions then leave their dependents in place)")
	var sas saFlag
	fs.Var(&sas, "service-account", "NS/NAME: also write <data-dir>/kubeconfig-NS-NAME with a token that authenticates as that ServiceAccount (repeatable)")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		logf("unexpected arguments: %v", fs.Args())
		return 2
	}

	// A parent that reads our stdout/stderr through pipes closes them when it
	// dies. Go kills a process that writes to a broken stdout/stderr with
	// SIGPIPE unless the signal is ignored; that would skip the cleanup below
	// (the logs are lost anyway once nobody reads them).
	signal.Ignore(syscall.SIGPIPE)

	// Everything that can ask us to stop funnels into one channel, so that the
	// startup wait and the steady state handle it the same way.
	stop := make(chan string, 4)
	// The API server installs its own SIGINT/SIGTERM handler: the first signal
	// starts its graceful shutdown, a second one exits the process at once.
	// So we forward a stop to it as a signal only when it did not get one.
	var signalled atomic.Bool
	sigCh := make(chan os.Signal, 4)
	signal.Notify(sigCh, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		for s := range sigCh {
			signalled.Store(true)
			stop <- "signal " + s.String()
		}
	}()
	if *exitOnEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			stop <- "standard input closed"
		}()
	}

	removeDir := false
	if *dataDir == "" {
		sweepStaleTempDirs()
		d, err := os.MkdirTemp("", tempDirPrefix)
		if err != nil {
			logf("create temp dir: %v", err)
			return 1
		}
		// Lets a later run remove this directory if we die without cleaning up.
		if err := os.WriteFile(filepath.Join(d, pidFile), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
			logf("write pid file: %v", err)
			_ = os.RemoveAll(d)
			return 1
		}
		*dataDir, removeDir = d, true
	}
	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		logf("data dir: %v", err)
		return 1
	}
	cleanupDir := func() {
		if removeDir {
			_ = os.RemoveAll(dir)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		logf("create data dir: %v", err)
		return 1
	}

	etcd, etcdURL, err := startEtcd(filepath.Join(dir, "etcd"))
	if err != nil {
		logf("etcd: %v", err)
		cleanupDir()
		return 1
	}
	closeEtcd := func() {
		logLevel.SetLevel(zap.FatalLevel)
		etcd.Close()
		cleanupDir()
	}

	securePort := *port
	if securePort == 0 {
		if securePort, err = freePort(); err != nil {
			logf("%v", err)
			closeEtcd()
			return 1
		}
	}
	files, err := writeSecrets(dir, sas)
	if err != nil {
		logf("%v", err)
		closeEtcd()
		return 1
	}

	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(securePort),
		"--cert-dir=" + filepath.Join(dir, "apiserver-certs"),
		"--tls-cert-file=" + files.servingCert,
		"--tls-private-key-file=" + files.servingKey,
		"--token-auth-file=" + files.tokens,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + files.saKey,
		"--service-account-signing-key-file=" + files.saKey,
		"--service-cluster-ip-range=10.0.0.0/24",
		// No controller-manager creates ServiceAccounts, so the admission
		// plugin that requires them would reject every Pod.
		"--disable-admission-plugins=ServiceAccount",
		// Nothing routes to this server through a Service; don't maintain
		// the endpoints of the "kubernetes" Service.
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--profiling=false",
	}
	// A stop requested while etcd started: the API server's signal handler
	// (installed by NewAPIServerCommand) would never see that signal.
	select {
	case reason := <-stop:
		logf("shutting down: %s before ready", reason)
		closeEtcd()
		return 1
	default:
	}
	cmd := app.NewAPIServerCommand()
	cmd.SetArgs(args)
	apiDone := make(chan int, 1)
	go func() { apiDone <- cli.Run(cmd) }()

	server := "https://127.0.0.1:" + strconv.Itoa(securePort)
	ctx, cancel := context.WithTimeout(context.Background(), startupTimeout)
	readyErr := make(chan error, 1)
	go func() { readyErr <- waitReady(ctx, server, files.caPEM, files.adminToken) }()

	// shutdown stops the API server gracefully (its own signal handler cancels
	// its context on SIGTERM), then etcd, then removes a temporary data dir.
	shutdown := func(reason string, code int) int {
		cancel()
		logf("shutting down: %s", reason)
		select {
		case <-apiDone:
		default:
			if !signalled.Load() {
				_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
			}
			select {
			case <-apiDone:
			case <-time.After(shutdownTimeout):
				logf("API server did not stop within %s", shutdownTimeout)
			}
		}
		closeEtcd()
		return code
	}

	// Before ready, give up without a graceful stop of the API server: a stop
	// while its post-start hooks run makes it exit the process fatally (klog)
	// before we could clean up.
	abort := func(reason string) int {
		cancel()
		logf("giving up: %s", reason)
		closeEtcd()
		return 1
	}
	select {
	case reason := <-stop:
		return abort(reason + " before ready")
	case code := <-apiDone:
		return abort(fmt.Sprintf("API server exited during startup with code %d", code))
	case err := <-etcd.Err():
		return abort(fmt.Sprintf("etcd failed: %v", err))
	case err := <-readyErr:
		if err != nil {
			return abort(fmt.Sprintf("API server not ready: %v", err))
		}
	}
	cancel()

	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, server, files.caPEM, "admin", files.adminToken, ""); err != nil {
		return shutdown(err.Error(), 1)
	}
	for _, sa := range files.serviceAccounts {
		path := filepath.Join(dir, "kubeconfig-"+sa.namespace+"-"+sa.name)
		user := "system:serviceaccount:" + sa.namespace + ":" + sa.name
		if err := writeKubeconfig(path, server, files.caPEM, user, sa.token, sa.namespace); err != nil {
			return shutdown(err.Error(), 1)
		}
	}
	// The one line on stdout that parents wait for; everything else is stderr.
	out := bufio.NewWriter(os.Stdout)
	fmt.Fprintf(out, "READY %s\n", kubeconfig)
	if err := out.Flush(); err != nil {
		return shutdown(fmt.Sprintf("write READY line: %v", err), 1)
	}
	logf("ready: %s (etcd %s)", server, etcdURL)

	// The garbage collector runs until the stop; it is stopped before the API
	// server so that it does not log a storm of failed requests.
	gcCtx, stopGC := context.WithCancel(context.Background())
	defer stopGC()
	gcDone := make(chan error, 1)
	if *noGC {
		logf("garbage collector disabled")
	} else {
		cfg := &rest.Config{
			Host:            server,
			BearerToken:     files.adminToken,
			TLSClientConfig: rest.TLSClientConfig{CAData: files.caPEM},
		}
		go func() { gcDone <- runGarbageCollector(gcCtx, cfg) }()
	}
	shutdownAll := func(reason string, code int) int {
		if !*noGC {
			stopGC()
			select {
			case <-gcDone:
			case <-time.After(shutdownTimeout):
				logf("garbage collector did not stop within %s", shutdownTimeout)
			}
		}
		return shutdown(reason, code)
	}

	select {
	case reason := <-stop:
		return shutdownAll(reason, 0)
	case err := <-gcDone:
		return shutdown(fmt.Sprintf("garbage collector: %v", err), 1)
	case code := <-apiDone:
		logf("API server exited with code %d", code)
		closeEtcd()
		if code == 0 {
			code = 1 // it must not stop on its own
		}
		return code
	case err := <-etcd.Err():
		return shutdownAll(fmt.Sprintf("etcd failed: %v", err), 1)
	}
}

// gcSyncPeriod is how often the garbage collector asks discovery for new
// resource types and starts watching them (and how long its first sync may
// take). kube-controller-manager uses 30 s; tests install CRDs after start and
// delete owners of those types seconds later, so a short period matters here.
const gcSyncPeriod = 2 * time.Second

// gcWorkers is the number of concurrent deletion (and orphaning) workers;
// kube-controller-manager's default, --concurrent-gc-syncs, is 20.
const gcWorkers = 5

// runGarbageCollector runs the upstream garbage collector controller as
// kube-controller-manager's newGarbageCollectorController and
// CreateControllerContext (cmd/kube-controller-manager/app) set it up, with
// the admin credentials in cfg, until ctx is cancelled. It returns an error
// only if it cannot start.
func runGarbageCollector(ctx context.Context, cfg *rest.Config) error {
	cfg = rest.CopyConfig(cfg)
	cfg.UserAgent = "kube-control-plane/garbage-collector"
	// Higher than client-go's default 5/10: each deletion takes two requests.
	cfg.QPS, cfg.Burst = 100, 200
	ctx = klog.NewContext(ctx, klog.Background().WithName("garbage-collector"))

	kubeClient, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	metadataClient, err := metadata.NewForConfig(cfg)
	if err != nil {
		return err
	}
	// Two discovery clients, as upstream: the one given to Sync must not be
	// the REST mapper's, which Sync resets when the resources change.
	mapperDiscovery, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return err
	}
	syncDiscovery, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return err
	}
	restMapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(mapperDiscovery))

	// Informers drop managedFields, as kube-controller-manager's do; no
	// periodic resync (upstream: 12-24 h).
	trim := func(obj any) (any, error) {
		if accessor, err := meta.Accessor(obj); err == nil && accessor.GetManagedFields() != nil {
			accessor.SetManagedFields(nil)
		}
		return obj, nil
	}
	sharedInformers := informers.NewSharedInformerFactoryWithOptions(kubeClient, 0, informers.WithTransform(trim))
	metadataInformers := metadatainformer.NewSharedInformerFactoryWithOptions(metadataClient, 0, metadatainformer.WithTransform(trim))
	informersStarted := make(chan struct{})

	gc, err := garbagecollector.NewGarbageCollector(ctx, kubeClient, metadataClient, restMapper,
		garbagecollector.DefaultIgnoredResources(),
		informerfactory.NewInformerFactory(sharedInformers, metadataInformers),
		informersStarted)
	if err != nil {
		return fmt.Errorf("create garbage collector: %w", err)
	}
	// No other controller shares the informers: start them (none registered
	// yet; the collector's monitors start theirs) and let the monitors run.
	sharedInformers.Start(ctx.Done())
	metadataInformers.Start(ctx.Done())
	close(informersStarted)

	logf("garbage collector: starting (%d workers, discovery resync every %s)", gcWorkers, gcSyncPeriod)
	var wg sync.WaitGroup
	wg.Go(func() { gc.Run(ctx, gcWorkers, gcSyncPeriod) })
	wg.Go(func() { gc.Sync(ctx, syncDiscovery, gcSyncPeriod) })
	wg.Wait()
	sharedInformers.Shutdown()
	metadataInformers.Shutdown()
	return nil
}

const (
	// tempDirPrefix names the data directories we create (and may sweep).
	tempDirPrefix = "kube-control-plane-"
	// pidFile in such a directory holds the pid of the harness that owns it.
	pidFile = "harness.pid"
)

// sweepStaleTempDirs removes data directories that earlier harnesses created
// and could not remove because they were killed (SIGKILL, OOM). Each holds
// etcd's preallocated WAL, so leaks add up. A directory is removed only when
// its pid file names a process that no longer exists; one without a pid file
// may be in creation and is left alone.
func sweepStaleTempDirs() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), tempDirPrefix+"*"))
	for _, d := range dirs {
		data, err := os.ReadFile(filepath.Join(d, pidFile))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
		if err != nil || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			logf("removing stale data dir %s (pid %d is gone)", d, pid)
			_ = os.RemoveAll(d)
		}
	}
}

// logLevel is the embedded etcd's log level, raised before closing it.
var logLevel zap.AtomicLevel

// startEtcd starts a single-member etcd on free loopback ports. Durability is
// traded for speed (no fsync): the data is thrown away with the test run.
func startEtcd(dir string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	clientURL := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(clientPort)}
	peerURL := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(peerPort)}

	// etcd preallocates each WAL segment (64 MB by default); tests write
	// little, so smaller segments keep a run's disk footprint small.
	wal.SegmentSizeBytes = 8 << 20

	cfg := embed.NewConfig()
	cfg.Name = "test"
	cfg.Dir = dir
	cfg.UnsafeNoFsync = true
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	// Only errors, and none once we close it: etcd logs every listener it
	// shuts down as a failure, which would bury real errors in the log tail.
	logLevel = zap.NewAtomicLevelAt(zap.ErrorLevel)
	zcfg := zap.NewProductionConfig()
	zcfg.Level = logLevel
	zcfg.OutputPaths = []string{"stderr"}
	zcfg.ErrorOutputPaths = []string{"stderr"}
	lg, err := zcfg.Build()
	if err != nil {
		return nil, "", err
	}
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(lg)

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, clientURL.String(), nil
	case err := <-e.Err():
		e.Close()
		return nil, "", err
	case <-time.After(startupTimeout):
		e.Close()
		return nil, "", errors.New("etcd did not become ready in time")
	}
}

// freePort asks the kernel for a free loopback port. Another process could
// take it before it is used again; ephemeral ports are random enough that
// this is rare, and the caller fails loudly if it happens.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// secretFiles are the credentials written for one run.
type secretFiles struct {
	servingCert, servingKey, saKey, tokens string
	caPEM                                  []byte
	adminToken                             string
	serviceAccounts                        []serviceAccount
}

// writeSecrets writes the serving certificate (with its CA), the
// service-account signing key and the static token file.
func writeSecrets(dir string, sas []serviceAccount) (*secretFiles, error) {
	pki := filepath.Join(dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return nil, err
	}
	// A fresh CA and a serving certificate for 127.0.0.1/localhost signed by
	// it; the PEM holds the serving certificate followed by the CA.
	chainPEM, keyPEM, err := cert.GenerateSelfSignedCertKey("127.0.0.1", []net.IP{net.ParseIP("127.0.0.1")}, []string{"localhost"})
	if err != nil {
		return nil, fmt.Errorf("generate serving certificate: %w", err)
	}
	caPEM, err := lastCertificate(chainPEM)
	if err != nil {
		return nil, err
	}
	f := &secretFiles{
		servingCert: filepath.Join(pki, "serving.crt"),
		servingKey:  filepath.Join(pki, "serving.key"),
		saKey:       filepath.Join(pki, "service-account.key"),
		tokens:      filepath.Join(pki, "tokens.csv"),
		caPEM:       caPEM,
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	saDER, err := x509.MarshalECPrivateKey(saKey)
	if err != nil {
		return nil, err
	}
	saPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saDER})

	// Static tokens: token,user,uid,"group1,group2". The ServiceAccount lines
	// carry the same user and groups as a real ServiceAccount token would, so
	// RBAC bindings to the ServiceAccount apply to them.
	if f.adminToken, err = randomToken(); err != nil {
		return nil, err
	}
	var csv strings.Builder
	fmt.Fprintf(&csv, "%s,admin,admin,\"system:masters\"\n", f.adminToken)
	for _, sa := range sas {
		if sa.token, err = randomToken(); err != nil {
			return nil, err
		}
		user := "system:serviceaccount:" + sa.namespace + ":" + sa.name
		fmt.Fprintf(&csv, "%s,%s,%s,\"system:serviceaccounts,system:serviceaccounts:%s,system:authenticated\"\n",
			sa.token, user, user, sa.namespace)
		f.serviceAccounts = append(f.serviceAccounts, sa)
	}

	for path, data := range map[string][]byte{
		f.servingCert:                chainPEM,
		f.servingKey:                 keyPEM,
		f.saKey:                      saPEM,
		f.tokens:                     []byte(csv.String()),
		filepath.Join(pki, "ca.crt"): caPEM,
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// lastCertificate returns the last PEM certificate of a chain: the CA that
// GenerateSelfSignedCertKey appends after the serving certificate. Clients
// trust only that CA.
func lastCertificate(chain []byte) ([]byte, error) {
	var last *pem.Block
	for rest := chain; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			last = b
		}
	}
	if last == nil {
		return nil, errors.New("no certificate in generated chain")
	}
	return pem.EncodeToMemory(last), nil
}

func randomToken() (string, error) {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// waitReady polls /readyz, then waits until the "default" namespace exists
// (created by a post-start hook) so that callers can use the server at once.
func waitReady(ctx context.Context, server string, caPEM []byte, token string) error {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return errors.New("bad CA certificate")
	}
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}},
	}
	get := func(path string) (int, string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, server+path, nil)
		if err != nil {
			return 0, "", err
		}
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := client.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return resp.StatusCode, string(body), nil
	}
	var last string
	for _, path := range []string{"/readyz", "/api/v1/namespaces/default"} {
		for {
			code, body, err := get(path)
			if err == nil && code == http.StatusOK {
				break
			}
			if err != nil {
				last = err.Error()
			} else {
				last = fmt.Sprintf("HTTP %d: %s", code, strings.TrimSpace(body))
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("GET %s: %s", path, last)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

// writeKubeconfig writes a kubeconfig with a bearer token atomically (temp
// file + rename), so a reader never sees a half-written file.
func writeKubeconfig(path, server string, caPEM []byte, user, token, namespace string) error {
	const name = "mde-test"
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[name] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caPEM}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts[name] = &clientcmdapi.Context{Cluster: name, AuthInfo: user, Namespace: namespace}
	cfg.CurrentContext = name
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return fmt.Errorf("encode kubeconfig: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".kubeconfig-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
