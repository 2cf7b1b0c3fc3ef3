package config

import (
	"errors"
	"fmt"
	"reflect"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/kasproject/kas/internal/suggest"
)

// yaml.v3 can reject unknown keys (KnownFields) and report type errors, but it
// stops at the first unknown key and names neither the dotted key nor a
// likely fix. So decoding walks the yaml.Node tree against the Config struct
// itself: mappings are matched to struct fields by their yaml tags (inline
// fields included), leaves are handed to yaml.v3 one at a time, and every
// problem is recorded under its full key.

// nodeDecoder decodes yaml.Node trees into Go values, recording problems
// instead of stopping at the first one.
type nodeDecoder struct {
	problems *problems
}

var unmarshalerType = reflect.TypeFor[yaml.Unmarshaler]()

// decode decodes n into v (addressable), naming problems after key. A null
// node leaves v as it is, so a key written without a value keeps its default.
func (d *nodeDecoder) decode(key string, n *yaml.Node, v reflect.Value) {
	n = resolveAlias(n)
	if n.ShortTag() == "!!null" {
		return
	}
	if reflect.PointerTo(v.Type()).Implements(unmarshalerType) {
		d.decodeLeaf(key, n, v)
		return
	}
	switch v.Kind() {
	case reflect.Struct:
		d.decodeStruct(key, n, v)
	case reflect.Pointer:
		if v.Type().Elem().Kind() != reflect.Struct {
			d.decodeLeaf(key, n, v)
			return
		}
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		d.decode(key, n, v.Elem())
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			d.problems.addUndecodable(key, n.Line, "want a list, got %s", describeNode(n))
			return
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, item := range n.Content {
			itemKey := fmt.Sprintf("%s[%d]", key, i)
			d.problems.lines[itemKey] = item.Line
			d.decode(itemKey, item, s.Index(i))
		}
		v.Set(s)
	default:
		d.decodeLeaf(key, n, v)
	}
}

// decodeStruct matches the keys of mapping n to the fields of struct v.
func (d *nodeDecoder) decodeStruct(key string, n *yaml.Node, v reflect.Value) {
	if n.Kind != yaml.MappingNode {
		d.problems.addUndecodable(displayKey(key), n.Line, "want a mapping of keys to values, got %s", describeNode(n))
		return
	}
	fields, names := structFields(v.Type())
	seen := make(map[string]int)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		if k.ShortTag() == "!!merge" {
			d.problems.addAt(displayKey(key), k.Line, "YAML merge keys (<<) are not supported; write the keys out")
			continue
		}
		if k.Kind != yaml.ScalarNode {
			d.problems.addAt(displayKey(key), k.Line, "a key must be a plain name, got %s", describeNode(k))
			continue
		}
		full := joinKey(key, k.Value)
		if first, dup := seen[k.Value]; dup {
			d.problems.addAt(full, k.Line, "set twice (first on line %d); keep one", first)
			continue
		}
		seen[k.Value] = k.Line
		d.problems.lines[full] = k.Line
		index, ok := fields[k.Value]
		if !ok {
			d.problems.addAt(full, k.Line, "%s", unknownKeyMessage(key, k.Value, names))
			continue
		}
		d.decode(full, val, v.FieldByIndex(index))
	}
}

// decodeLeaf lets yaml.v3 decode a scalar (or a type with its own
// UnmarshalYAML) and turns its error into one that names the key.
func (d *nodeDecoder) decodeLeaf(key string, n *yaml.Node, v reflect.Value) {
	target := reflect.New(v.Type())
	if err := n.Decode(target.Interface()); err != nil {
		var typeErr *yaml.TypeError
		if errors.As(err, &typeErr) && !reflect.PointerTo(v.Type()).Implements(unmarshalerType) {
			d.problems.addUndecodable(key, n.Line, "want %s, got %s", describeType(v.Type()), describeNode(n))
		} else {
			// A type with its own UnmarshalYAML (Duration) words its own message.
			d.problems.addUndecodable(key, n.Line, "%s", strings.TrimPrefix(err.Error(), "yaml: "))
		}
		return
	}
	v.Set(target.Elem())
}

// structFields maps each YAML key of struct type t to the field's index,
// descending into ",inline" fields, and lists the keys in declaration order.
func structFields(t reflect.Type) (map[string][]int, []string) {
	fields := make(map[string][]int)
	var names []string
	var walk func(t reflect.Type, prefix []int)
	walk = func(t reflect.Type, prefix []int) {
		for i := range t.NumField() {
			f := t.Field(i)
			if !f.IsExported() {
				continue
			}
			name, flags, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if name == "-" {
				continue
			}
			index := append(append([]int(nil), prefix...), i)
			if strings.Contains(","+flags+",", ",inline,") {
				walk(f.Type, index)
				continue
			}
			if name == "" {
				name = strings.ToLower(f.Name)
			}
			fields[name] = index
			names = append(names, name)
		}
	}
	walk(t, nil)
	return fields, names
}

// unknownKeyMessage explains an unknown key at the level named parent,
// suggesting the closest known key when one is close enough to be a typo.
func unknownKeyMessage(parent, name string, known []string) string {
	if best, ok := suggest.Closest(name, known, max(2, len(name)/3)); ok {
		return fmt.Sprintf("unknown key %s; did you mean %s?", joinKey(parent, name), joinKey(parent, best))
	}
	where := "at the top level"
	if parent != "" {
		where = "under " + parent
	}
	return fmt.Sprintf("unknown key %s; the keys %s are %s", joinKey(parent, name), where, strings.Join(known, ", "))
}

func resolveAlias(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

func joinKey(parent, name string) string {
	if parent == "" {
		return name
	}
	return parent + "." + name
}

// displayKey names the top level for problems about the whole document.
func displayKey(key string) string {
	if key == "" {
		return "(top level)"
	}
	return key
}

func describeNode(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	default:
		return fmt.Sprintf("%q", n.Value)
	}
}

func describeType(t reflect.Type) string {
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "a whole number"
	case reflect.String:
		return "a string"
	default:
		return "a " + t.String()
	}
}
