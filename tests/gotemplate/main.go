// Command gotemplate lends Go's own text/template, fmt and encoding/json to the Ollama-compatible test
// server (tests/ollama_server.py), used the way Ollama 0.32 uses them: template.Parse and
// Template.Execute in template/template.go, the `parameters` text of GetModelInfo in server/routes.go.
//
// The server starts it once and talks JSON lines: one request object per line on stdin, one answer per
// line on stdout, in order. Every answer carries "error" when the operation failed.
//
//	{"op": "parse", "template": T}                  -> {"vars": [...]}  (lower-cased identifiers, as Ollama's Vars)
//	{"op": "render", "template": T, "messages": [...], "prompt": P, "suffix": S, "tools": [...],
//	 "think_value": true|false|"high"|..., "think": false, "think_level": "", "is_think_set": false}
//	                                                -> {"text": "..."}  (the prompt Ollama would send the runner)
//	{"op": "show_parameters", "parameters": {...}}  -> {"lines": [...], "values": [...]}  (%#v and %v lines, sorted)
//	{"op": "json", "value": V}                      -> {"text": "..."}  (json.Marshal of V as Go decoded it)
//
// Messages and tools are Ollama's API types (package api here, as in Ollama) and reach the template as
// Ollama's template package converts them (package template here), so that `.ToolCalls`, `.Function.Arguments`
// and `.Tools` print, range and fail as in Ollama, type names in error messages included. A "think_value"
// (a request's think) sets Think, ThinkLevel and IsThinkSet as Ollama does; without one, the three fields are
// taken as given.
//
// Standard library only, so that `go build` needs no network.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
	"time"

	"so8t.test/gotemplate/api"
	ollama "so8t.test/gotemplate/template"
)

type request struct {
	Op         string          `json:"op"`
	Template   string          `json:"template"`
	Messages   []api.Message   `json:"messages"`
	Prompt     string          `json:"prompt"`
	Suffix     string          `json:"suffix"`
	Tools      api.Tools       `json:"tools"`
	ThinkValue *api.ThinkValue `json:"think_value"`
	Think      bool            `json:"think"`
	ThinkLevel string          `json:"think_level"`
	IsThinkSet bool            `json:"is_think_set"`
	Parameters map[string]any  `json:"parameters"`
	Value      any             `json:"value"`
}

type answer struct {
	Error  string   `json:"error,omitempty"`
	Vars   []string `json:"vars,omitempty"`
	Text   string   `json:"text"`
	Lines  []string `json:"lines,omitempty"`
	Values []string `json:"values,omitempty"`
}

// funcs are the functions Ollama registers for model templates.
var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string {
		switch p := v.(type) {
		case api.ToolProperty:
			return p.ToTypeScriptType()
		case *api.ToolProperty:
			if p != nil {
				return p.ToTypeScriptType()
			}
		}
		return "any"
	},
}

// parseTemplate parses like Ollama's template.Parse: missing keys print as zero values, and a template
// that names neither .Messages nor .Response gets a trailing {{ .Response }}.
func parseTemplate(text string) (*template.Template, []string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(text)
	if err != nil {
		return nil, nil, err
	}
	vars, err := templateVars(tmpl)
	if err != nil {
		return nil, nil, err
	}
	if !contains(vars, "messages") && !contains(vars, "response") {
		tmpl.Tree.Root.Nodes = append(tmpl.Tree.Root.Nodes, responseAction())
	}
	return tmpl, vars, nil
}

func responseAction() *parse.ActionNode {
	field := &parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}
	command := &parse.CommandNode{NodeType: parse.NodeCommand, Args: []parse.Node{field}}
	pipe := &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{command}}
	return &parse.ActionNode{NodeType: parse.NodeAction, Pipe: pipe}
}

// templateVars lists the field and variable names of every defined template, lower-cased, sorted, unique.
func templateVars(tmpl *template.Template) ([]string, error) {
	seen := map[string]bool{}
	for _, t := range tmpl.Templates() {
		if t.Tree == nil {
			continue
		}
		for _, node := range t.Tree.Root.Nodes {
			names, err := identifiers(node)
			if err != nil {
				return nil, err
			}
			for _, name := range names {
				seen[strings.ToLower(name)] = true
			}
		}
	}
	vars := make([]string, 0, len(seen))
	for name := range seen {
		vars = append(vars, name)
	}
	sort.Strings(vars)
	return vars, nil
}

// identifiers collects names from the node kinds Ollama looks at (fields, variables, pipelines, branches).
func identifiers(node parse.Node) ([]string, error) {
	var names []string
	add := func(n parse.Node) error {
		more, err := identifiers(n)
		names = append(names, more...)
		return err
	}
	switch n := node.(type) {
	case *parse.ListNode:
		for _, child := range n.Nodes {
			if err := add(child); err != nil {
				return names, err
			}
		}
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return nil, fmt.Errorf("undefined template specified")
		}
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		if n.Pipe == nil {
			return nil, fmt.Errorf("undefined action in template")
		}
		return identifiers(n.Pipe)
	case *parse.IfNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.RangeNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.WithNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.PipeNode:
		for _, command := range n.Cmds {
			for _, arg := range command.Args {
				if err := add(arg); err != nil {
					return names, err
				}
			}
		}
	case *parse.FieldNode:
		return n.Ident, nil
	case *parse.VariableNode:
		return n.Ident, nil
	}
	return names, nil
}

func branchIdentifiers(n *parse.BranchNode) ([]string, error) {
	if n.Pipe == nil {
		return nil, fmt.Errorf("undefined branch")
	}
	names, err := identifiers(n.Pipe)
	if err != nil {
		return names, err
	}
	for _, list := range []*parse.ListNode{n.List, n.ElseList} {
		if list == nil {
			continue
		}
		more, err := identifiers(list)
		names = append(names, more...)
		if err != nil {
			return names, err
		}
	}
	return names, nil
}

func contains(list []string, s string) bool {
	for _, item := range list {
		if item == s {
			return true
		}
	}
	return false
}

// collate merges consecutive messages of one role (tool messages excepted) with a blank line between
// them, and joins every system message into one system prompt, as Ollama does before rendering.
func collate(msgs []api.Message) (string, []*api.Message) {
	var system []string
	var out []*api.Message
	for i := range msgs {
		m := &msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
			continue
		}
		out = append(out, m)
	}
	return strings.Join(system, "\n\n"), out
}

// render builds the prompt as Ollama's Template.Execute does: a fill-in-the-middle request gets Prompt and
// Suffix; a template that uses .Messages gets all of them at once; any other template is executed once
// per completed turn with .System/.Prompt/.Response, and the last turn stops right after {{ .Response }}.
func render(req request) (string, error) {
	tmpl, vars, err := parseTemplate(req.Template)
	if err != nil {
		return "", err
	}
	if req.ThinkValue != nil { // as server/prompt.go's renderPrompt turns a request's think into Values
		req.Think, req.ThinkLevel, req.IsThinkSet = req.ThinkValue.Bool(), req.ThinkValue.String(), true
	}
	values := func(fields map[string]any) map[string]any {
		fields["Think"], fields["ThinkLevel"], fields["IsThinkSet"] = req.Think, req.ThinkLevel, req.IsThinkSet
		return fields
	}
	system, msgs := collate(req.Messages)
	var b bytes.Buffer
	switch {
	case req.Prompt != "" && req.Suffix != "":
		err = tmpl.Execute(&b, values(map[string]any{"Prompt": req.Prompt, "Suffix": req.Suffix, "Response": ""}))
	case contains(vars, "messages"):
		err = tmpl.Execute(&b, values(map[string]any{"System": system, "Messages": ollama.Messages(msgs),
			"Tools": ollama.Tools(req.Tools), "Response": ""}))
	default:
		err = renderTurns(&b, tmpl, msgs, values)
	}
	return b.String(), err
}

func renderTurns(w io.Writer, tmpl *template.Template, msgs []*api.Message, values func(map[string]any) map[string]any) error {
	var system, prompt, response string
	flush := func() error {
		if err := tmpl.Execute(w, values(map[string]any{"System": system, "Prompt": prompt, "Response": response})); err != nil {
			return err
		}
		system, prompt, response = "", "", ""
		return nil
	}
	for _, m := range msgs {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := flush(); err != nil {
					return err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := flush(); err != nil {
					return err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	root := cutAfterResponse(tmpl.Tree.Root.Copy())
	// Like Ollama, the cut tree runs in a fresh template: no model functions, default missingkey.
	last := template.Must(template.New("").AddParseTree("", &parse.Tree{Root: root.(*parse.ListNode)}))
	return last.Execute(w, values(map[string]any{"System": system, "Prompt": prompt, "Response": response}))
}

// cutAfterResponse drops every node that follows the first {{ .Response }} field, walking the tree in the
// order Ollama's deleteNode does. Its quirks come along on purpose: a pipeline loses the command after
// the field, an else branch after the field trips a nil conversion (a panic), branch conditions are
// never cut points.
func cutAfterResponse(root parse.Node) parse.Node {
	cut := false
	drop := func(n parse.Node) bool {
		if field, ok := n.(*parse.FieldNode); ok && contains(field.Ident, "Response") {
			cut = true
			return false
		}
		return cut
	}
	var walk func(parse.Node) parse.Node
	walk = func(node parse.Node) parse.Node {
		if drop(node) {
			return nil
		}
		switch n := node.(type) {
		case *parse.ListNode:
			var kept []parse.Node
			for _, child := range n.Nodes {
				if k := walk(child); k != nil {
					kept = append(kept, k)
				}
			}
			n.Nodes = kept
		case *parse.IfNode:
			n.BranchNode = *walk(&n.BranchNode).(*parse.BranchNode)
		case *parse.WithNode:
			n.BranchNode = *walk(&n.BranchNode).(*parse.BranchNode)
		case *parse.RangeNode:
			n.BranchNode = *walk(&n.BranchNode).(*parse.BranchNode)
		case *parse.BranchNode:
			n.List = walk(n.List).(*parse.ListNode)
			if n.ElseList != nil {
				n.ElseList = walk(n.ElseList).(*parse.ListNode)
			}
		case *parse.ActionNode:
			pipe := walk(n.Pipe)
			if pipe == nil {
				return nil
			}
			n.Pipe = pipe.(*parse.PipeNode)
		case *parse.PipeNode:
			var commands []*parse.CommandNode
			for _, command := range n.Cmds {
				var args []parse.Node
				for _, arg := range command.Args {
					if k := walk(arg); k != nil {
						args = append(args, k)
					}
				}
				if len(args) == 0 {
					return nil
				}
				command.Args = args
				commands = append(commands, command)
			}
			if len(commands) == 0 {
				return nil
			}
			n.Cmds = commands
		}
		return node
	}
	return walk(root)
}

// showParameters prints a model's parameters the way /api/show does (one line per list element), sorted
// here because Go's map order is random; `values` holds the %v form the Modelfile uses.
func showParameters(params map[string]any) ([]string, []string) {
	var lines, values []string
	for key, value := range params {
		items := []any{value}
		if list, ok := value.([]any); ok {
			items = list
		}
		for _, item := range items {
			lines = append(lines, fmt.Sprintf("%-*s %#v", 30, key, item))
			values = append(values, fmt.Sprintf("%s %v", key, item))
		}
	}
	sort.Strings(lines)
	sort.Strings(values)
	return lines, values
}

func handle(req request) (a answer) {
	defer func() {
		if r := recover(); r != nil { // e.g. a template whose main body is empty: Ollama panics there as well
			a = answer{Error: fmt.Sprintf("panic: %v", r)}
		}
	}()
	switch req.Op {
	case "parse":
		_, vars, err := parseTemplate(req.Template)
		if err != nil {
			return answer{Error: err.Error()}
		}
		return answer{Vars: vars}
	case "render":
		text, err := render(req)
		if err != nil {
			return answer{Error: err.Error()}
		}
		return answer{Text: text}
	case "show_parameters":
		lines, values := showParameters(req.Parameters)
		return answer{Lines: lines, Values: values}
	case "json":
		b, err := json.Marshal(req.Value)
		if err != nil {
			return answer{Error: err.Error()}
		}
		return answer{Text: string(b)}
	}
	return answer{Error: fmt.Sprintf("unknown op %q", req.Op)}
}

func main() {
	in := json.NewDecoder(bufio.NewReader(os.Stdin))
	out := bufio.NewWriter(os.Stdout)
	enc := json.NewEncoder(out)
	for {
		var req request
		if err := in.Decode(&req); err == io.EOF {
			return
		} else if err != nil {
			fmt.Fprintln(os.Stderr, "gotemplate: bad request:", err)
			os.Exit(2)
		}
		if err := enc.Encode(handle(req)); err != nil {
			fmt.Fprintln(os.Stderr, "gotemplate:", err)
			os.Exit(2)
		}
		if err := out.Flush(); err != nil {
			os.Exit(2)
		}
	}
}
