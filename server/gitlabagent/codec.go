package gitlabagent

import (
	"sync"

	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// codec is gRPC's protobuf codec with kas's own message buffers. gRPC's
// default pool zeroes every buffer it lends, and lends a 1 MiB one for a
// message just over 32 KiB, which is what agentk's body chunks are: that
// zeroing cost kas more than everything else of a streamed body.
type codec struct{}

var _ encoding.CodecV2 = codec{}

// Name keeps the standard content-subtype, so agentk notices nothing.
func (codec) Name() string { return grpcproto.Name }

// pooledMessageSize is the size of the pooled buffers, enough for a body
// chunk with its envelope; larger messages get a buffer of their own.
const pooledMessageSize = 64 << 10

func (codec) Marshal(v any) (mem.BufferSlice, error) {
	m := v.(proto.Message)
	size := proto.Size(m)
	if mem.IsBelowBufferPoolingThreshold(size) {
		b, err := proto.Marshal(m)
		return mem.BufferSlice{mem.SliceBuffer(b)}, err
	}
	buf := messageBuffers.Get(size)
	b, err := (proto.MarshalOptions{}).MarshalAppend((*buf)[:0], m)
	if err != nil {
		messageBuffers.Put(buf)
		return nil, err
	}
	*buf = b
	return mem.BufferSlice{mem.NewBuffer(buf, messageBuffers)}, nil
}

func (codec) Unmarshal(data mem.BufferSlice, v any) error {
	m := v.(proto.Message)
	if len(data) == 1 {
		return proto.Unmarshal(data[0].ReadOnlyData(), m)
	}
	// proto.Unmarshal copies what it keeps, so the buffer goes back at once.
	buf := messageBuffers.Get(data.Len())
	data.CopyTo(*buf)
	err := proto.Unmarshal(*buf, m)
	messageBuffers.Put(buf)
	return err
}

// messageBuffers lends buffers of pooledMessageSize without zeroing them:
// every byte lent is written before it is read.
var messageBuffers = &bufferPool{}

type bufferPool struct{ pool sync.Pool }

func (p *bufferPool) Get(length int) *[]byte {
	if length > pooledMessageSize {
		b := make([]byte, length)
		return &b
	}
	if b, ok := p.pool.Get().(*[]byte); ok {
		*b = (*b)[:length]
		return b
	}
	b := make([]byte, length, pooledMessageSize)
	return &b
}

func (p *bufferPool) Put(b *[]byte) {
	if cap(*b) == pooledMessageSize {
		p.pool.Put(b)
	}
}

// responseData returns the body bytes of an encoded HttpResponse that
// holds only a data chunk, without copying them; ok is false for every
// other message, which is then decoded as a whole.
func responseData(b []byte) (data []byte, ok bool) {
	// HttpResponse{data (2): Data{data (1): bytes}}
	num, typ, n := protowire.ConsumeTag(b)
	if n < 0 || num != 2 || typ != protowire.BytesType {
		return nil, false
	}
	inner, m := protowire.ConsumeBytes(b[n:])
	if m < 0 || n+m != len(b) {
		return nil, false
	}
	if len(inner) == 0 {
		return inner, true
	}
	num, typ, n = protowire.ConsumeTag(inner)
	if n < 0 || num != 1 || typ != protowire.BytesType {
		return nil, false
	}
	data, m = protowire.ConsumeBytes(inner[n:])
	if m < 0 || n+m != len(inner) {
		return nil, false
	}
	return data, true
}
