// Package kubestatus writes the answers kas itself gives on the Kubernetes API
// proxy as Kubernetes Status objects, so kubectl and client-go report them the
// way they report the API server's own errors ("Error from server (Forbidden):
// ...", "error: You must be logged in to the server (...)").
//
// The Status is a plain struct with the same JSON as
// k8s.io/apimachinery/pkg/apis/meta/v1.Status rather than that type itself:
// kas only ever writes these seven fields, and importing meta/v1 would pull
// apimachinery's runtime, schema and protobuf machinery into the kas binary for
// them. The tests decode the output with client-go to prove the JSON and the
// reasons are the ones Kubernetes clients understand.
package kubestatus

import (
	"encoding/json"
	"net/http"
)

// Reason is a Kubernetes StatusReason: the machine-readable why of a Failure.
// client-go's apierrors.IsForbidden, IsNotFound, … test it, and kubectl prints
// it in parentheses.
type Reason string

// The reasons kas uses, with the values of meta/v1's StatusReason constants.
const (
	ReasonBadRequest         Reason = "BadRequest"         // 400
	ReasonUnauthorized       Reason = "Unauthorized"       // 401
	ReasonForbidden          Reason = "Forbidden"          // 403
	ReasonNotFound           Reason = "NotFound"           // 404
	ReasonTooManyRequests    Reason = "TooManyRequests"    // 429
	ReasonInternalError      Reason = "InternalError"      // 500, and 502 (see ReasonForCode)
	ReasonServiceUnavailable Reason = "ServiceUnavailable" // 503
	ReasonTimeout            Reason = "Timeout"            // 504
)

// ReasonForCode is the reason Kubernetes pairs with an HTTP status code, the
// same mapping client-go applies to an error response without a Status body
// (apierrors.NewGenericServerResponse). Kubernetes has no reason for 502 Bad
// Gateway; like client-go, kas reports every 5xx without a reason of its own
// as InternalError, so apierrors.IsInternalError holds for it. Codes with no
// Kubernetes reason give "" (kubectl then prints "Error from server: ...").
func ReasonForCode(code int) Reason {
	switch code {
	case http.StatusBadRequest:
		return ReasonBadRequest
	case http.StatusUnauthorized:
		return ReasonUnauthorized
	case http.StatusForbidden:
		return ReasonForbidden
	case http.StatusNotFound:
		return ReasonNotFound
	case http.StatusTooManyRequests:
		return ReasonTooManyRequests
	case http.StatusServiceUnavailable:
		return ReasonServiceUnavailable
	case http.StatusGatewayTimeout:
		return ReasonTimeout
	}
	if code >= 500 && code <= 599 {
		return ReasonInternalError
	}
	return ""
}

// Status is the JSON of a Kubernetes meta/v1 Status with status "Failure".
type Status struct {
	Kind       string   `json:"kind"`
	APIVersion string   `json:"apiVersion"`
	Metadata   struct{} `json:"metadata"`
	Status     string   `json:"status"`
	Message    string   `json:"message,omitempty"`
	Reason     Reason   `json:"reason,omitempty"`
	Code       int      `json:"code"`
}

// Write answers with a Failure Status. code must be a 4xx or 5xx status: a
// Failure with any other code would be a bug in kas, and client-go would take
// a 2xx for success, so any other code is written as 500 InternalError. An
// empty reason is filled from ReasonForCode. message is shown to the caller
// as is: it must not carry secrets or internal details.
//
// Like http.Error, Write must be called before anything else is written, and
// the caller should write nothing after it.
func Write(w http.ResponseWriter, code int, reason Reason, message string) {
	if code < 400 || code > 599 {
		code, reason = http.StatusInternalServerError, ReasonInternalError
	}
	if reason == "" {
		reason = ReasonForCode(code)
	}
	// Marshalling strings and an int cannot fail.
	body, _ := json.Marshal(Status{
		Kind:       "Status",
		APIVersion: "v1",
		Status:     "Failure",
		Message:    message,
		Reason:     reason,
		Code:       code,
	})
	h := w.Header()
	// Headers copied from an upstream response before the failure no longer
	// describe this body.
	h.Del("Content-Length")
	h.Del("Content-Encoding")
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	// These answers are about one caller's credentials and one moment's
	// state: no shared cache may keep them.
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write(body) // a write error means the caller has gone; nobody is left to tell
}

// BadRequest writes 400 BadRequest: the request can never succeed as sent.
func BadRequest(w http.ResponseWriter, message string) {
	Write(w, http.StatusBadRequest, ReasonBadRequest, message)
}

// Unauthorized writes 401 Unauthorized: missing or invalid credentials.
func Unauthorized(w http.ResponseWriter, message string) {
	Write(w, http.StatusUnauthorized, ReasonUnauthorized, message)
}

// Forbidden writes 403 Forbidden: valid credentials, not allowed for this agent.
func Forbidden(w http.ResponseWriter, message string) {
	Write(w, http.StatusForbidden, ReasonForbidden, message)
}

// NotFound writes 404 NotFound: no such agent.
func NotFound(w http.ResponseWriter, message string) {
	Write(w, http.StatusNotFound, ReasonNotFound, message)
}

// TooManyRequests writes 429 TooManyRequests: a limit was hit; set a
// Retry-After header first if the caller should retry.
func TooManyRequests(w http.ResponseWriter, message string) {
	Write(w, http.StatusTooManyRequests, ReasonTooManyRequests, message)
}

// BadGateway writes 502 with reason InternalError: the agent, the API server
// or GitLab failed to answer properly (see ReasonForCode for the reason).
func BadGateway(w http.ResponseWriter, message string) {
	Write(w, http.StatusBadGateway, ReasonInternalError, message)
}

// ServiceUnavailable writes 503 ServiceUnavailable: the agent is not connected.
func ServiceUnavailable(w http.ResponseWriter, message string) {
	Write(w, http.StatusServiceUnavailable, ReasonServiceUnavailable, message)
}

// GatewayTimeout writes 504 Timeout: the request did not finish in time.
func GatewayTimeout(w http.ResponseWriter, message string) {
	Write(w, http.StatusGatewayTimeout, ReasonTimeout, message)
}
