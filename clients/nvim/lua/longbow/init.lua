-- Longbow for Neovim: starts `longbow lsp` for Python and TypeScript buffers and shows its inline fills.
-- Works on Neovim 0.7+ (vim.lsp.start_client; 0.8+ would also accept vim.lsp.start with the same config).
--
--   require("longbow").setup({ address = "127.0.0.1:50051" })
--   :LongbowInline   ask for a fill at the cursor (shown as virtual text)
--   :LongbowAccept   insert the fill shown
local M = {}

M.config = {
  cmd = { "longbow", "lsp" }, -- the executable; address/token/tls flags are appended
  address = nil, -- host:port of `longbow serve`; nil: the server's config (LONGBOW_HOST / LONGBOW_PORT)
  token = nil,
  tls = false,
  extra_args = {}, -- e.g. { "--max-tokens", "16" }
  filetypes = { "python", "typescript", "typescriptreact" },
  root_markers = { ".git", "pyproject.toml", "setup.py", "package.json", "tsconfig.json" },
}

local namespace = vim.api.nvim_create_namespace("longbow_inline")
local shown = {} -- bufnr -> { line, col, text } of the fill on screen

local function command()
  local cmd = vim.deepcopy(M.config.cmd)
  if M.config.address then vim.list_extend(cmd, { "--address", M.config.address }) end
  if M.config.token then vim.list_extend(cmd, { "--token", M.config.token }) end
  if M.config.tls then table.insert(cmd, "--tls") end
  return vim.list_extend(cmd, M.config.extra_args)
end

local function root_of(bufnr)
  local dir = vim.fn.fnamemodify(vim.api.nvim_buf_get_name(bufnr), ":p:h")
  for _, marker in ipairs(M.config.root_markers) do
    local file = vim.fn.findfile(marker, dir .. ";")
    local found = file ~= "" and file or vim.fn.finddir(marker, dir .. ";")
    if found ~= "" then
      local absolute = (vim.fn.fnamemodify(found, ":p"):gsub("/$", ""))
      return vim.fn.fnamemodify(absolute, ":h") -- the directory holding the marker
    end
  end
  return dir
end

M.clients = {} -- root -> client id (one server per workspace root)

function M.attach(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local root = root_of(bufnr)
  local id = M.clients[root]
  if not id or vim.lsp.get_client_by_id(id) == nil then
    id = vim.lsp.start_client({
      name = "longbow",
      cmd = command(),
      root_dir = root,
      workspace_folders = { { uri = vim.uri_from_fname(root), name = vim.fn.fnamemodify(root, ":t") } },
    })
    M.clients[root] = id
  end
  if id then vim.lsp.buf_attach_client(bufnr, id) end
  return id
end

local function clear(bufnr)
  vim.api.nvim_buf_clear_namespace(bufnr, namespace, 0, -1)
  shown[bufnr] = nil
end

-- Ask for inline fills at the cursor; `done(items)` gets the raw InlineCompletionItems (tests use it).
function M.inline(done)
  local bufnr = vim.api.nvim_get_current_buf()
  local params = vim.lsp.util.make_position_params() -- the cursor in the client's encoding (UTF-16)
  params.context = { triggerKind = 1 } -- Invoked
  local cursor = vim.api.nvim_win_get_cursor(0)
  vim.lsp.buf_request(bufnr, "textDocument/inlineCompletion", params, function(err, result)
    local items = (result and (result.items or result)) or {}
    clear(bufnr)
    if not err and items[1] and items[1].insertText ~= "" then
      local first = vim.split(items[1].insertText, "\n", true)[1]
      vim.api.nvim_buf_set_extmark(bufnr, namespace, cursor[1] - 1, cursor[2],
        { virt_text = { { first, "Comment" } }, virt_text_pos = "overlay" })
      shown[bufnr] = { line = cursor[1] - 1, col = cursor[2], text = items[1].insertText }
    end
    if done then done(items, err) end
  end)
end

function M.accept()
  local bufnr = vim.api.nvim_get_current_buf()
  local fill = shown[bufnr]
  if not fill then return end
  clear(bufnr)
  vim.api.nvim_buf_set_text(bufnr, fill.line, fill.col, fill.line, fill.col, vim.split(fill.text, "\n", true))
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", M.config, opts or {})
  local group = vim.api.nvim_create_augroup("longbow", { clear = true })
  vim.api.nvim_create_autocmd("FileType", {
    group = group,
    pattern = M.config.filetypes,
    callback = function(args) M.attach(args.buf) end,
  })
  vim.api.nvim_create_autocmd({ "InsertLeave", "TextChangedI" }, {
    group = group,
    callback = function(args) clear(args.buf) end,
  })
  vim.api.nvim_create_user_command("LongbowInline", function() M.inline() end, {})
  vim.api.nvim_create_user_command("LongbowAccept", M.accept, {})
end

return M
