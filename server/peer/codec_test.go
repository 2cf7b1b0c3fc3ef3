package peer

import (
	"bytes"
	"io"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/kasproject/kas/server/peer/peerpb"
)

func TestCodecReceivesDataWithoutDecoding(t *testing.T) {
	c := newCodec()
	big := bytes.Repeat([]byte("0123456789"), 5000)
	withUnknownField := protowire.AppendTag(mustMarshal(t, &peerpb.ServerMessage{Msg: &peerpb.ServerMessage_Data{Data: []byte("abc")}}),
		15, protowire.VarintType)
	withUnknownField = protowire.AppendVarint(withUnknownField, 1)
	tests := []struct {
		name     string
		wire     []byte
		wantData []byte // kept in gRPC's buffers
		wantMsg  func(*peerpb.ServerMessage) bool
	}{
		{name: "small data", wire: mustMarshal(t, &peerpb.ServerMessage{Msg: &peerpb.ServerMessage_Data{Data: []byte("abc")}}), wantData: []byte("abc")},
		{name: "data across buffers", wire: mustMarshal(t, &peerpb.ServerMessage{Msg: &peerpb.ServerMessage_Data{Data: big}}), wantData: big},
		{name: "empty data", wire: mustMarshal(t, &peerpb.ServerMessage{Msg: &peerpb.ServerMessage_Data{}}), wantData: []byte{}},
		{
			name: "head", wire: mustMarshal(t, &peerpb.ServerMessage{Msg: &peerpb.ServerMessage_Head{Head: &peerpb.ResponseHead{StatusCode: 204}}}),
			wantMsg: func(m *peerpb.ServerMessage) bool { return m.GetHead().GetStatusCode() == 204 },
		},
		{
			name: "data with a field this version does not know", wire: withUnknownField,
			wantMsg: func(m *peerpb.ServerMessage) bool { return string(m.GetData()) == "abc" },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var msg peerpb.ServerMessage
			r := received{msg: &msg}
			// Split the wire bytes into buffers the way frames split a message.
			var data mem.BufferSlice
			for rest := tt.wire; len(rest) > 0; {
				n := min(len(rest), 16<<10)
				data = append(data, mem.SliceBuffer(rest[:n]))
				rest = rest[n:]
			}
			if err := c.Unmarshal(data, &r); err != nil {
				t.Fatal(err)
			}
			if tt.wantData != nil {
				if !r.isData {
					t.Fatal("data message decoded as a whole")
				}
				got, err := io.ReadAll(&r.data)
				if err != nil || !bytes.Equal(got, tt.wantData) {
					t.Fatalf("data = %d bytes, %v; want %d bytes", len(got), err, len(tt.wantData))
				}
				return
			}
			if r.isData || r.data.Remaining() != 0 {
				t.Fatal("message taken for bare data")
			}
			if !tt.wantMsg(&msg) {
				t.Fatalf("decoded %v", &msg)
			}
		})
	}
}

func mustMarshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
