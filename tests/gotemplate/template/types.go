// Package template mirrors what Ollama's template package (template/template.go) hands a chat template: the
// same unexported types, fields and String methods, built from the api types the same way, so that reflect
// names them as in Ollama ("*template.templateMessage") and fmt and encoding/json print them alike.
package template

import (
	"encoding/json"

	"so8t.test/gotemplate/api"
)

type templateTools []templateTool

func (t templateTools) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type templateArgs map[string]any

func (t templateArgs) String() string {
	if t == nil {
		return "{}"
	}
	b, _ := json.Marshal(t)
	return string(b)
}

type templateProperties map[string]api.ToolProperty

func (t templateProperties) String() string {
	if t == nil {
		return "{}"
	}
	b, _ := json.Marshal(t)
	return string(b)
}

type templateTool struct {
	Type     string               `json:"type"`
	Items    any                  `json:"items,omitempty"`
	Function templateToolFunction `json:"function"`
}

func (t templateTool) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type templateToolFunction struct {
	Name        string                         `json:"name"`
	Description string                         `json:"description"`
	Parameters  templateToolFunctionParameters `json:"parameters"`
}

type templateToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties templateProperties `json:"properties"`
}

type templateToolCall struct {
	ID       string
	Function templateToolCallFunction
}

type templateToolCallFunction struct {
	Index     int
	Name      string
	Arguments templateArgs
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []api.ImageData
	ToolCalls  []templateToolCall
	ToolName   string
	ToolCallID string
}

// Tools is what `.Tools` holds: nil without tools, a templateTools otherwise.
func Tools(tools api.Tools) any {
	if tools == nil {
		return templateTools(nil)
	}
	out := make(templateTools, len(tools))
	for i, tool := range tools {
		p := tool.Function.Parameters
		out[i] = templateTool{Type: tool.Type, Items: tool.Items, Function: templateToolFunction{
			Name: tool.Function.Name, Description: tool.Function.Description,
			Parameters: templateToolFunctionParameters{Type: p.Type, Defs: p.Defs, Items: p.Items,
				Required: p.Required, Properties: templateProperties(p.Properties.ToMap())},
		}}
	}
	return out
}

// Messages is what `.Messages` holds: the collated messages as *templateMessage.
func Messages(msgs []*api.Message) any {
	if msgs == nil {
		return []*templateMessage(nil)
	}
	out := make([]*templateMessage, len(msgs))
	for i, m := range msgs {
		var calls []templateToolCall
		for _, call := range m.ToolCalls {
			calls = append(calls, templateToolCall{ID: call.ID, Function: templateToolCallFunction{
				Index: call.Function.Index, Name: call.Function.Name,
				Arguments: templateArgs(call.Function.Arguments.ToMap()),
			}})
		}
		out[i] = &templateMessage{Role: m.Role, Content: m.Content, Thinking: m.Thinking, Images: m.Images,
			ToolCalls: calls, ToolName: m.ToolName, ToolCallID: m.ToolCallID}
	}
	return out
}
