package kubestatus

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"
)

// helperCases covers every helper: what it writes, and how client-go (and so
// kubectl) classifies the answer.
var helperCases = []struct {
	name     string
	write    func(http.ResponseWriter, string)
	code     int
	reason   Reason
	classify func(error) bool
}{
	{"BadRequest", BadRequest, 400, ReasonBadRequest, apierrors.IsBadRequest},
	{"Unauthorized", Unauthorized, 401, ReasonUnauthorized, apierrors.IsUnauthorized},
	{"Forbidden", Forbidden, 403, ReasonForbidden, apierrors.IsForbidden},
	{"NotFound", NotFound, 404, ReasonNotFound, apierrors.IsNotFound},
	{"TooManyRequests", TooManyRequests, 429, ReasonTooManyRequests, apierrors.IsTooManyRequests},
	{"BadGateway", BadGateway, 502, ReasonInternalError, apierrors.IsInternalError},
	{"ServiceUnavailable", ServiceUnavailable, 503, ReasonServiceUnavailable, apierrors.IsServiceUnavailable},
	{"GatewayTimeout", GatewayTimeout, 504, ReasonTimeout, apierrors.IsTimeout},
}

func TestHelpersWriteStatus(t *testing.T) {
	const msg = `agent 7 is not connected; "quotes" <and> ünïcode`
	for _, tc := range helperCases {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			rec.Header().Set("Content-Length", "12345")
			rec.Header().Set("Content-Encoding", "gzip")
			tc.write(rec, msg)

			if rec.Code != tc.code {
				t.Errorf("code = %d, want %d", rec.Code, tc.code)
			}
			for name, want := range map[string]string{
				"Content-Type":           "application/json",
				"X-Content-Type-Options": "nosniff",
				"Cache-Control":          "no-store",
				"Content-Length":         "",
				"Content-Encoding":       "",
			} {
				if got := rec.Header().Get(name); got != want {
					t.Errorf("header %s = %q, want %q", name, got, want)
				}
			}
			var got map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
				t.Fatalf("body %q is not JSON: %v", rec.Body, err)
			}
			want := map[string]any{
				"kind":       "Status",
				"apiVersion": "v1",
				"metadata":   map[string]any{},
				"status":     "Failure",
				"message":    msg,
				"reason":     string(tc.reason),
				"code":       float64(tc.code),
			}
			if len(got) != len(want) {
				t.Errorf("body has fields %v, want exactly %v", got, want)
			}
			for k, v := range want {
				gv, ok := got[k]
				if !ok {
					t.Errorf("body lacks %q", k)
					continue
				}
				if k == "metadata" {
					if m, ok := gv.(map[string]any); !ok || len(m) != 0 {
						t.Errorf("metadata = %v, want {}", gv)
					}
					continue
				}
				if gv != v {
					t.Errorf("%s = %v, want %v", k, gv, v)
				}
			}
		})
	}
}

// TestClientGoUnderstandsStatus sends a request with client-go's REST client
// (what kubectl uses) to a server answering through each helper, and checks
// that client-go turns the answer into the matching typed API error.
func TestClientGoUnderstandsStatus(t *testing.T) {
	const msg = "kas says no"
	for _, tc := range helperCases {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				tc.write(w, msg)
			}))
			defer srv.Close()

			err := newRESTClient(t, srv.URL).Get().AbsPath("/api/v1/namespaces").Do(context.Background()).Error()
			if err == nil {
				t.Fatal("client-go saw no error")
			}
			if !tc.classify(err) {
				t.Errorf("client-go error %#v is not classified as %s", err, tc.reason)
			}
			if got := apierrors.ReasonForError(err); string(got) != string(tc.reason) {
				t.Errorf("client-go reason = %q, want %q", got, tc.reason)
			}
			var se *apierrors.StatusError
			if !errors.As(err, &se) || apierrors.IsUnexpectedServerError(err) {
				t.Fatalf("client-go did not decode the Status body: %#v", err)
			}
			if se.ErrStatus.Code != int32(tc.code) {
				t.Errorf("client-go code = %d, want %d", se.ErrStatus.Code, tc.code)
			}
			if err.Error() != msg {
				t.Errorf("client-go message = %q, want %q", err.Error(), msg)
			}
		})
	}
}

func newRESTClient(t *testing.T, host string) *rest.RESTClient {
	t.Helper()
	scheme := runtime.NewScheme()
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
	c, err := rest.UnversionedRESTClientFor(&rest.Config{
		Host: host,
		ContentConfig: rest.ContentConfig{
			NegotiatedSerializer: serializer.NewCodecFactory(scheme).WithoutConversion(),
		},
	})
	if err != nil {
		t.Fatalf("create REST client: %v", err)
	}
	return c
}

func TestReasonsMatchKubernetes(t *testing.T) {
	for ours, theirs := range map[Reason]metav1.StatusReason{
		ReasonBadRequest:         metav1.StatusReasonBadRequest,
		ReasonUnauthorized:       metav1.StatusReasonUnauthorized,
		ReasonForbidden:          metav1.StatusReasonForbidden,
		ReasonNotFound:           metav1.StatusReasonNotFound,
		ReasonTooManyRequests:    metav1.StatusReasonTooManyRequests,
		ReasonInternalError:      metav1.StatusReasonInternalError,
		ReasonServiceUnavailable: metav1.StatusReasonServiceUnavailable,
		ReasonTimeout:            metav1.StatusReasonTimeout,
	} {
		if string(ours) != string(theirs) {
			t.Errorf("reason %q, Kubernetes spells it %q", ours, theirs)
		}
	}
}

func TestReasonForCode(t *testing.T) {
	for _, tc := range []struct {
		code int
		want Reason
	}{
		{400, ReasonBadRequest},
		{401, ReasonUnauthorized},
		{403, ReasonForbidden},
		{404, ReasonNotFound},
		{429, ReasonTooManyRequests},
		{500, ReasonInternalError},
		{502, ReasonInternalError},
		{503, ReasonServiceUnavailable},
		{504, ReasonTimeout},
		{599, ReasonInternalError},
		{418, ""},
		{200, ""},
		{600, ""},
	} {
		if got := ReasonForCode(tc.code); got != tc.want {
			t.Errorf("ReasonForCode(%d) = %q, want %q", tc.code, got, tc.want)
		}
	}
}

func TestWrite(t *testing.T) {
	for _, tc := range []struct {
		name       string
		code       int
		reason     Reason
		wantCode   int
		wantReason Reason
	}{
		{"explicit reason kept", 403, ReasonForbidden, 403, ReasonForbidden},
		{"empty reason from code", 502, "", 502, ReasonInternalError},
		{"code without reason", 418, "", 418, ""},
		{"2xx is a bug, becomes 500", 200, ReasonForbidden, 500, ReasonInternalError},
		{"1xx is a bug, becomes 500", 101, "", 500, ReasonInternalError},
		{"out of range becomes 500", 1000, "", 500, ReasonInternalError},
		{"negative becomes 500", -1, "", 500, ReasonInternalError},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			Write(rec, tc.code, tc.reason, "m")
			if rec.Code != tc.wantCode {
				t.Errorf("HTTP code = %d, want %d", rec.Code, tc.wantCode)
			}
			var s Status
			if err := json.Unmarshal(rec.Body.Bytes(), &s); err != nil {
				t.Fatalf("body %q: %v", rec.Body, err)
			}
			if s.Code != tc.wantCode || s.Reason != tc.wantReason || s.Status != "Failure" || s.Message != "m" {
				t.Errorf("status = %+v, want code %d reason %q", s, tc.wantCode, tc.wantReason)
			}
			var raw map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &raw); err != nil {
				t.Fatal(err)
			}
			if _, ok := raw["reason"]; ok == (tc.wantReason == "") {
				t.Errorf("reason present = %v, want %v; body %s", ok, tc.wantReason != "", rec.Body)
			}
		})
	}
}
