package peer

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	"github.com/kasproject/kas/server/peer/peerpb"
)

// idleConnTimeout is how long an unused connection to a peer URL is kept.
// Nodes come and go (new pods get new addresses), so connections to URLs
// nobody has used for this long are closed when a new one is opened.
const idleConnTimeout = 10 * time.Minute

// connectTimeout bounds one attempt to connect to a peer; peers are on the
// same network, so an unanswered connect means the node is gone and the
// request should move on to another URL.
const connectTimeout = 3 * time.Second

// connPool keeps one gRPC connection per peer URL, made on first use.
type connPool struct {
	dialOpts   []grpc.DialOption // without transport credentials
	tls        *tls.Config       // for grpcs://; ServerName set per URL
	serverName string
	idle       time.Duration
	now        func() time.Time
	gauge      prometheus.Gauge

	mu     sync.Mutex
	conns  map[string]*peerConn
	closed bool
}

// peerConn is one pooled connection and its use.
type peerConn struct {
	url      string
	cc       *grpc.ClientConn
	client   peerpb.ForwardClient
	inUse    int       // calls in flight; guarded by connPool.mu
	lastUsed time.Time // guarded by connPool.mu
}

func newConnPool(tokens *tokenSource, tlsConfig *tls.Config, serverName string, gauge prometheus.Gauge) *connPool {
	return &connPool{
		dialOpts: []grpc.DialOption{
			grpc.WithPerRPCCredentials(tokens),
			grpc.WithInitialWindowSize(streamWindow),
			grpc.WithInitialConnWindowSize(connWindow),
			grpc.WithReadBufferSize(ioBufferSize),
			grpc.WithWriteBufferSize(ioBufferSize),
			grpc.WithDefaultCallOptions(
				grpc.ForceCodecV2(newCodec()),
				grpc.MaxCallRecvMsgSize(maxMessageSize),
				grpc.MaxCallSendMsgSize(maxMessageSize),
			),
			grpc.WithKeepaliveParams(keepalive.ClientParameters{
				Time:                keepaliveTime,
				Timeout:             keepaliveTimeout,
				PermitWithoutStream: true,
			}),
			grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
				MinConnectTimeout: connectTimeout,
			}),
			grpc.WithUserAgent("kas-private-api"),
			// Requests are not idempotent; only gRPC's transparent retry of
			// streams the server never saw stays on.
			grpc.WithDisableRetry(),
		},
		tls:        tlsConfig,
		serverName: serverName,
		idle:       idleConnTimeout,
		now:        time.Now,
		gauge:      gauge,
		conns:      map[string]*peerConn{},
	}
}

// get returns the connection for rawURL, making it if needed; release it
// when the call is over.
func (p *connPool) get(rawURL string) (*peerConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, errors.New("the private API client is closed")
	}
	if pc := p.conns[rawURL]; pc != nil {
		pc.inUse++
		return pc, nil
	}
	target, creds, err := p.transport(rawURL)
	if err != nil {
		return nil, err
	}
	cc, err := grpc.NewClient(target, slices.Concat(p.dialOpts, []grpc.DialOption{grpc.WithTransportCredentials(creds)})...)
	if err != nil {
		return nil, fmt.Errorf("set up connection to kas node %s: %w", rawURL, err)
	}
	p.sweepLocked()
	pc := &peerConn{url: rawURL, cc: cc, client: peerpb.NewForwardClient(cc), inUse: 1}
	p.conns[rawURL] = pc
	p.gauge.Set(float64(len(p.conns)))
	return pc, nil
}

func (p *connPool) release(pc *peerConn) {
	p.mu.Lock()
	pc.inUse--
	pc.lastUsed = p.now()
	p.mu.Unlock()
}

// sweepLocked closes connections idle for longer than p.idle.
func (p *connPool) sweepLocked() {
	now := p.now()
	for u, pc := range p.conns {
		if pc.inUse == 0 && now.Sub(pc.lastUsed) > p.idle {
			_ = pc.cc.Close()
			delete(p.conns, u)
		}
	}
}

// close closes every connection, failing calls in flight.
func (p *connPool) close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	var errs []error
	for u, pc := range p.conns {
		if err := pc.cc.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close connection to kas node %s: %w", u, err))
		}
	}
	clear(p.conns)
	p.gauge.Set(0)
	return errors.Join(errs...)
}

// transport parses a peer URL (grpc://host:port or grpcs://host:port) into
// a gRPC target and the credentials to use.
func (p *connPool) transport(rawURL string) (string, credentials.TransportCredentials, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", nil, fmt.Errorf("kas node URL %q: %w", rawURL, err)
	}
	if u.Host == "" || u.Port() == "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		return "", nil, fmt.Errorf("kas node URL %q: want grpc://host:port or grpcs://host:port (check that node's OWN_PRIVATE_API_* settings)", rawURL)
	}
	// passthrough hands host:port to the dialer as is; no resolver runs.
	target := "passthrough:///" + u.Host
	switch u.Scheme {
	case "grpc":
		return target, insecure.NewCredentials(), nil
	case "grpcs":
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if p.tls != nil {
			cfg = p.tls.Clone()
		}
		cfg.ServerName = p.serverName
		if cfg.ServerName == "" {
			cfg.ServerName = u.Hostname()
		}
		return target, credentials.NewTLS(cfg), nil
	default:
		return "", nil, fmt.Errorf("kas node URL %q: scheme must be grpc or grpcs (check that node's OWN_PRIVATE_API_SCHEME)", rawURL)
	}
}
