// Command gothink tells the Ollama test server which thinking tags a model's Go TEMPLATE implies, the way
// Ollama's thinking.InferTags reads the parse tree (a capability of goTemplateCapabilities in
// server/images.go). Go's own text/template/parse builds the tree, so the answer is the tree Ollama sees.
//
// One request per run: {"template": T} on stdin, {"open": "...", "close": "..."} or {"error": "..."} on stdout.
// Standard library only.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

// The functions Ollama's template.Parse registers: only their names matter for parsing.
var funcs = template.FuncMap{
	"json":             func(v any) string { return "" },
	"currentDate":      func(...string) string { return "" },
	"yesterdayDate":    func(...string) string { return "" },
	"toTypeScriptType": func(any) string { return "" },
}

// children lists the nodes the walk descends into, in tree order.
func children(n parse.Node) []parse.Node {
	var out []parse.Node
	switch x := n.(type) {
	case *parse.ListNode:
		for _, c := range x.Nodes {
			out = append(out, c)
		}
	case *parse.BranchNode:
		for _, c := range []parse.Node{x.Pipe, x.List, x.ElseList} {
			if c != nil && !isNilPointer(c) {
				out = append(out, c)
			}
		}
	case *parse.ActionNode:
		out = append(out, x.Pipe)
	case *parse.IfNode:
		out = append(out, &x.BranchNode)
	case *parse.RangeNode:
		out = append(out, &x.BranchNode)
	case *parse.WithNode:
		out = append(out, &x.BranchNode)
	case *parse.TemplateNode:
		if x.Pipe != nil {
			out = append(out, x.Pipe)
		}
	case *parse.PipeNode:
		for _, c := range x.Cmds {
			out = append(out, c)
		}
	case *parse.CommandNode:
		out = append(out, x.Args...)
	}
	return out
}

// isNilPointer catches typed nil pointers stored in a parse.Node interface (an absent pipe, list or else list).
func isNilPointer(n parse.Node) bool {
	switch x := n.(type) {
	case *parse.PipeNode:
		return x == nil
	case *parse.ListNode:
		return x == nil
	}
	return false
}

// usesField reports whether a field node named `name` appears anywhere in the range's pipeline.
func usesField(r *parse.RangeNode, name string) bool {
	if r.Pipe == nil {
		return false
	}
	found := false
	var visit func(parse.Node)
	visit = func(n parse.Node) {
		if f, ok := n.(*parse.FieldNode); ok && f.Ident[0] == name {
			found = true
		}
		for _, c := range children(n) {
			visit(c)
		}
	}
	visit(r.Pipe)
	return found
}

// thinkTags: for every .Thinking field under a range over .Messages, the nearest enclosing list's first and
// last nodes, when they are text, give the opening and closing tags (trimmed); later finds overwrite earlier.
func thinkTags(root *parse.ListNode) (string, string) {
	var open, close string
	var path []parse.Node
	var visit func(parse.Node)
	visit = func(n parse.Node) {
		path = append(path, n)
		if f, ok := n.(*parse.FieldNode); ok && len(f.Ident) > 0 && f.Ident[0] == "Thinking" {
			var nearestRange *parse.RangeNode
			for i := len(path) - 1; i >= 0 && nearestRange == nil; i-- {
				nearestRange, _ = path[i].(*parse.RangeNode)
			}
			if nearestRange != nil && usesField(nearestRange, "Messages") {
				for i := len(path) - 1; i >= 0; i-- {
					list, ok := path[i].(*parse.ListNode)
					if !ok {
						continue
					}
					if t, ok := list.Nodes[0].(*parse.TextNode); ok {
						open = strings.TrimSpace(t.String())
					}
					if t, ok := list.Nodes[len(list.Nodes)-1].(*parse.TextNode); ok {
						close = strings.TrimSpace(t.String())
					}
					break
				}
			}
		}
		for _, c := range children(n) {
			visit(c)
		}
		path = path[:len(path)-1]
	}
	visit(root)
	return open, close
}

type answer struct {
	Open  string `json:"open"`
	Close string `json:"close"`
	Error string `json:"error,omitempty"`
}

func main() {
	var req struct {
		Template string `json:"template"`
	}
	out := json.NewEncoder(os.Stdout)
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		out.Encode(answer{Error: "bad request: " + err.Error()})
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		out.Encode(answer{Error: err.Error()})
		return
	}
	open, close := thinkTags(tmpl.Tree.Root)
	out.Encode(answer{Open: open, Close: close})
}
