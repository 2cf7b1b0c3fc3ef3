package peer

import (
	"encoding/binary"

	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// dataTag starts a message that holds only body bytes: field 2 (data) of
// ClientMessage and ServerMessage, wire type 2 (length-delimited).
const dataTag = 2<<3 | 2

// codec is gRPC's protobuf codec, except that body bytes are not copied out
// of gRPC's receive buffers into a new slice: a message received into a
// *received that holds only data keeps gRPC's buffers, and the body reader
// copies straight from them into its caller's buffer. That saves an
// allocation and a copy per chunk on every streamed body.
type codec struct {
	proto encoding.CodecV2
}

func newCodec() codec { return codec{proto: encoding.GetCodecV2(grpcproto.Name)} }

// Name keeps the standard content-subtype, so ordinary gRPC tools
// (grpcurl, health probes) talk to the private API as usual.
func (codec) Name() string { return grpcproto.Name }

func (c codec) Marshal(v any) (mem.BufferSlice, error) { return c.proto.Marshal(v) }

func (c codec) Unmarshal(data mem.BufferSlice, v any) error {
	r, ok := v.(*received)
	if !ok {
		return c.proto.Unmarshal(data, v)
	}
	r.data.Reset(data) // takes a reference; gRPC frees its own after we return
	if tag, err := r.data.ReadByte(); err == nil && tag == dataTag {
		if n, err := binary.ReadUvarint(&r.data); err == nil && n == uint64(r.data.Remaining()) {
			r.isData = true
			return nil
		}
	}
	// Anything else (a head, a trailer, data with fields a newer peer
	// added) is decoded as a whole.
	_ = r.data.Close()
	r.isData = false
	return c.proto.Unmarshal(data, r.msg)
}

// received is where one stream's messages are received, reused for each.
// After a data message, data holds its bytes; otherwise msg holds the
// message. Only the goroutine receiving on the stream may use it.
type received struct {
	msg    proto.Message
	isData bool
	data   mem.Reader
}
