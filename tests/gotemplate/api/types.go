// Package api mirrors the request types of Ollama's api package (api/types.go) that reach a chat template:
// the same names, fields, JSON tags and methods, so that templates print and fail as they do in Ollama.
// The ordered maps stand in for Ollama's internal/orderedmap (insertion order kept, standard library only).
package api

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// ImageData is an image's bytes (base64 in JSON). Unlike Ollama's, a string that is no base64 is kept as its
// own bytes instead of failing the request (test servers pass placeholder images).
type ImageData []byte

func (d *ImageData) UnmarshalJSON(data []byte) error {
	var text string
	if err := json.Unmarshal(data, &text); err != nil {
		return err
	}
	decoded, err := base64.StdEncoding.DecodeString(text)
	if err != nil {
		decoded = []byte(text)
	}
	*d = decoded
	return nil
}

// Message is one chat message; its role is lower-cased when it is decoded.
type Message struct {
	Role       string      `json:"role"`
	Content    string      `json:"content"`
	Thinking   string      `json:"thinking,omitempty"`
	Images     []ImageData `json:"images,omitempty"`
	ToolCalls  []ToolCall  `json:"tool_calls,omitempty"`
	ToolName   string      `json:"tool_name,omitempty"`
	ToolCallID string      `json:"tool_call_id,omitempty"`
}

func (m *Message) UnmarshalJSON(b []byte) error {
	type plain Message
	var p plain
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	*m = Message(p)
	m.Role = strings.ToLower(m.Role)
	return nil
}

type ToolCall struct {
	ID       string           `json:"id,omitempty"`
	Function ToolCallFunction `json:"function"`
}

type ToolCallFunction struct {
	Index     int                       `json:"index"`
	Name      string                    `json:"name"`
	Arguments ToolCallFunctionArguments `json:"arguments"`
}

// ToolCallFunctionArguments keeps the arguments in the order they came.
type ToolCallFunctionArguments struct {
	om *orderedMap[any]
}

func (t *ToolCallFunctionArguments) Len() int {
	if t == nil {
		return 0
	}
	return t.om.size()
}

func (t *ToolCallFunctionArguments) ToMap() map[string]any {
	if t == nil {
		return nil
	}
	return t.om.toMap()
}

func (t *ToolCallFunctionArguments) String() string {
	if t == nil || t.om == nil {
		return "{}"
	}
	b, _ := json.Marshal(t.om)
	return string(b)
}

func (t *ToolCallFunctionArguments) UnmarshalJSON(data []byte) error {
	t.om = &orderedMap[any]{}
	return json.Unmarshal(data, t.om)
}

func (t ToolCallFunctionArguments) MarshalJSON() ([]byte, error) {
	if t.om == nil {
		return []byte("{}"), nil
	}
	return json.Marshal(t.om)
}

type Tools []Tool

func (t Tools) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type Tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function ToolFunction `json:"function"`
}

func (t Tool) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type ToolFunction struct {
	Name        string                 `json:"name"`
	Description string                 `json:"description,omitempty"`
	Parameters  ToolFunctionParameters `json:"parameters"`
}

func (t *ToolFunction) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type ToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties *ToolPropertiesMap `json:"properties"`
}

func (t *ToolFunctionParameters) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

// ToolPropertiesMap keeps a schema's properties in the order they came.
type ToolPropertiesMap struct {
	om *orderedMap[ToolProperty]
}

func (t *ToolPropertiesMap) Len() int {
	if t == nil {
		return 0
	}
	return t.om.size()
}

func (t *ToolPropertiesMap) ToMap() map[string]ToolProperty {
	if t == nil {
		return nil
	}
	return t.om.toMap()
}

func (t ToolPropertiesMap) MarshalJSON() ([]byte, error) {
	if t.om == nil {
		return []byte("null"), nil
	}
	return json.Marshal(t.om)
}

func (t *ToolPropertiesMap) UnmarshalJSON(data []byte) error {
	t.om = &orderedMap[ToolProperty]{}
	return json.Unmarshal(data, t.om)
}

type ToolProperty struct {
	AnyOf       []ToolProperty     `json:"anyOf,omitempty"`
	Type        PropertyType       `json:"type,omitempty"`
	Items       any                `json:"items,omitempty"`
	Description string             `json:"description,omitempty"`
	Enum        []any              `json:"enum,omitempty"`
	Properties  *ToolPropertiesMap `json:"properties,omitempty"`
	Required    []string           `json:"required,omitempty"`
}

// ToTypeScriptType is the property's type in TypeScript notation.
func (tp ToolProperty) ToTypeScriptType() string {
	var names []string
	if len(tp.AnyOf) > 0 {
		for _, alternative := range tp.AnyOf {
			names = append(names, alternative.ToTypeScriptType())
		}
		return strings.Join(names, " | ")
	}
	if len(tp.Type) == 0 {
		return "any"
	}
	for _, name := range tp.Type {
		names = append(names, typeScriptName(name))
	}
	return strings.Join(names, " | ")
}

func typeScriptName(jsonType string) string {
	names := map[string]string{"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
		"array": "any[]", "object": "Record<string, any>", "null": "null"}
	if name, ok := names[jsonType]; ok {
		return name
	}
	return "any"
}

// PropertyType is a JSON schema type: one name, or a list of them.
type PropertyType []string

func (pt *PropertyType) UnmarshalJSON(data []byte) error {
	var one string
	if err := json.Unmarshal(data, &one); err == nil {
		*pt = []string{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(data, &many); err != nil {
		return err
	}
	*pt = many
	return nil
}

func (pt PropertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

func (pt PropertyType) String() string {
	switch len(pt) {
	case 0:
		return ""
	case 1:
		return pt[0]
	}
	return fmt.Sprintf("%v", []string(pt))
}

// ThinkValue is a request's think: a bool, or a level.
type ThinkValue struct {
	Value any
}

var levels = map[string]bool{"high": true, "medium": true, "low": true, "max": true}

// Bool is whether thinking is on.
func (t *ThinkValue) Bool() bool {
	if t == nil {
		return false
	}
	switch v := t.Value.(type) {
	case bool:
		return v
	case string:
		return levels[v]
	}
	return false
}

// String is the level: the string given, "medium" for true, "" otherwise.
func (t *ThinkValue) String() string {
	if t == nil {
		return ""
	}
	switch v := t.Value.(type) {
	case string:
		return v
	case bool:
		if v {
			return "medium"
		}
	}
	return ""
}

func (t *ThinkValue) UnmarshalJSON(data []byte) error {
	var b bool
	if err := json.Unmarshal(data, &b); err == nil {
		t.Value = b
		return nil
	}
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return errors.New(`think must be a boolean or string ("high", "medium", "low", "max", true, or false)`)
	}
	if !levels[s] {
		return fmt.Errorf(`invalid think value: %q (must be "high", "medium", "low", "max", true, or false)`, s)
	}
	t.Value = s
	return nil
}

// orderedMap is a JSON object that remembers its key order.
type orderedMap[V any] struct {
	keys   []string
	values map[string]V
}

func (m *orderedMap[V]) size() int {
	if m == nil {
		return 0
	}
	return len(m.keys)
}

func (m *orderedMap[V]) toMap() map[string]V {
	if m == nil || m.values == nil {
		return nil
	}
	out := make(map[string]V, len(m.keys))
	for _, k := range m.keys {
		out[k] = m.values[k]
	}
	return out
}

func (m *orderedMap[V]) UnmarshalJSON(data []byte) error {
	if string(bytes.TrimSpace(data)) == "null" { // Ollama's map stays unset
		m.keys, m.values = nil, nil
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return fmt.Errorf("expected a JSON object, got %s", data)
	}
	m.values = map[string]V{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return err
		}
		var v V
		if err := json.Unmarshal(raw, &v); err != nil {
			return err
		}
		key := tok.(string)
		if _, seen := m.values[key]; !seen {
			m.keys = append(m.keys, key)
		}
		m.values[key] = v
	}
	return nil
}

func (m *orderedMap[V]) MarshalJSON() ([]byte, error) {
	if m == nil || m.values == nil {
		return []byte("null"), nil
	}
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range m.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		key, err := json.Marshal(k)
		if err != nil {
			return nil, err
		}
		value, err := json.Marshal(m.values[k])
		if err != nil {
			return nil, err
		}
		b.Write(key)
		b.WriteByte(':')
		b.Write(value)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}
