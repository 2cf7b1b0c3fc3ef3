package agent

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"strings"

	"github.com/kasproject/kas/protocol"
)

// serveUpgrade performs the HTTP/1.1 upgrade kas asked for (kubectl exec,
// attach, port-forward over WebSocket or SPDY) against the API server. On 101
// it answers 200 with protocol.HeaderUpgradeStatus and then splices the
// stream's bodies to the upgraded connection; any other answer is passed
// through as it is.
func (a *Agent) serveUpgrade(w http.ResponseWriter, r *http.Request, id *protocol.Identity, upgrade string) {
	ctx := r.Context()
	out := r.Clone(ctx)
	out.RequestURI = ""
	// The stream's body is the upgraded byte stream, not a request body.
	out.Body, out.GetBody, out.ContentLength = http.NoBody, nil, 0
	removeHopByHopHeaders(out.Header)
	setUpstreamIdentity(out.Header, id, r.Header.Values(protocol.HeaderForwardedFor))
	out.Header.Set("Connection", "Upgrade")
	out.Header.Set("Upgrade", upgrade)
	(&httputil.ProxyRequest{In: r, Out: out}).SetURL(a.apiServer)

	resp, err := a.upgradeTransport.RoundTrip(out)
	if err != nil {
		a.apiServerFailed(w, r, err)
		return
	}
	defer resp.Body.Close()

	if resp.StatusCode != http.StatusSwitchingProtocols {
		copyEndToEndHeaders(w.Header(), resp.Header)
		w.WriteHeader(resp.StatusCode)
		if err := a.copyFlushing(w, resp.Body); err != nil && ctx.Err() == nil {
			a.logger.Debug("copy refused upgrade answer", "path", r.URL.Path, "error", err.Error())
		}
		return
	}
	upstream, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		a.apiServerFailed(w, r, errors.New("the API server switched protocols but the connection cannot be written to"))
		return
	}
	copyEndToEndHeaders(w.Header(), resp.Header)
	if _, ok := w.Header()["Date"]; !ok {
		// kas relays these headers as the API server's 101: add none of
		// the HTTP/2 server's own (a nil Date suppresses it).
		w.Header()["Date"] = nil
	}
	w.Header().Set(protocol.HeaderUpgradeStatus, "101")
	w.Header().Set(protocol.HeaderUpgrade, resp.Header.Get("Upgrade"))
	w.WriteHeader(http.StatusOK)
	if err := http.NewResponseController(w).Flush(); err != nil {
		return
	}
	a.splice(ctx, w, r.Body, upstream)
}

// splice copies kas → API server and API server → kas until either side
// ends, then closes both.
func (a *Agent) splice(ctx context.Context, w http.ResponseWriter, fromKAS io.ReadCloser, upstream io.ReadWriteCloser) {
	stop := context.AfterFunc(ctx, func() { _ = upstream.Close() })
	defer stop()

	uploaded := make(chan struct{})
	go func() {
		defer close(uploaded)
		buf := a.streamBuffers.Get()
		defer a.streamBuffers.Put(buf)
		_, _ = io.CopyBuffer(upstream, fromKAS, buf)
		_ = upstream.Close()
	}()

	_ = a.copyFlushing(w, upstream)
	_ = upstream.Close()
	_ = fromKAS.Close() // unblocks the upload copy
	<-uploaded
}

// copyFlushing copies src to w and flushes after every read, so interactive
// and streaming bytes go out at once.
func (a *Agent) copyFlushing(w http.ResponseWriter, src io.Reader) error {
	rc := http.NewResponseController(w)
	buf := a.streamBuffers.Get()
	defer a.streamBuffers.Put(buf)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
			if ferr := rc.Flush(); ferr != nil {
				return ferr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// removeHopByHopHeaders deletes the headers that belong to one HTTP/1.1
// connection and never cross a proxy (RFC 9110 section 7.6.1), including
// those the Connection header names.
func removeHopByHopHeaders(h http.Header) {
	for _, v := range h.Values("Connection") {
		for name := range strings.SplitSeq(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range [...]string{
		"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
		"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
	} {
		h.Del(name)
	}
}

// copyEndToEndHeaders adds src's headers to dst, except hop-by-hop ones,
// which HTTP/2 forbids, and Kas-* ones, which only agentk may send kas.
func copyEndToEndHeaders(dst, src http.Header) {
	src = src.Clone()
	removeHopByHopHeaders(src)
	deleteTunnelHeaders(src)
	for k, vv := range src {
		dst[k] = append(dst[k], vv...)
	}
}
